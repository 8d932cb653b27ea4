"""What a training stage trains: one interface over the two kinds of encoder.

A LiT encoder trains its heads over the bank's cached tower features (the towers are locked,
so a step costs microseconds); an MLLM encoder trains LoRA through full forward passes of
the bank's items. The loss code sees only `embed(item ids) -> unit rows` and `logit_scale`.
"""
from __future__ import annotations

import numpy as np
import torch

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import towers
from umr.retrieval.encoders.base import Encoder, Prepared
from umr.retrieval.encoders.concept import ConceptEncoder
from umr.retrieval.encoders.lit import LitEncoder
from umr.retrieval.items import Item
from umr.training.examples import FeatureBank

LIT_TRAINABLE = {"heads": (), "text-head": ("image_proj",), "image-head": ("text_proj",)}


class LitTrainee:
    def __init__(self, encoder: LitEncoder, bank: FeatureBank):
        self.encoder, self.bank = encoder, bank
        self.logit_scale = encoder.heads.logit_scale

    def parameters(self, trainable: str, learn_temperature: bool) -> list[torch.nn.Parameter]:
        if trainable not in LIT_TRAINABLE:
            raise InvalidArgument(f"trainable {trainable!r} does not apply to a LiT encoder "
                             f"(use {', '.join(LIT_TRAINABLE)}); lora is for hf-mllm encoders")
        frozen = LIT_TRAINABLE[trainable]
        params = []
        for name, p in self.encoder.heads.named_parameters():
            p.requires_grad_(not name.startswith(frozen) and (learn_temperature or name != "logit_scale"))
            if p.requires_grad:
                params.append(p)
        return params

    def module(self) -> torch.nn.Module:
        return self.encoder.heads

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        return self.bank.embed(self.encoder.heads, ids)

    def train(self, on: bool) -> None:
        self.encoder.heads.train(on)
        if not on:
            for p in self.encoder.heads.parameters():
                p.requires_grad_(True)
            self.encoder.__dict__.pop("_fingerprint", None)
            self.encoder._digest = None


class ConceptTrainee:
    """lit-base v2's image map trains alone against MiniLM's frozen caption vectors; the encoder
    adds it to the concept bridge behind the domain gate only at encoding time (trained through
    the bridge, it pulls out-of-domain photos toward the training captions: docs/zero-shot.md).
    The gate is anchored on the stage's photos when training starts."""

    def __init__(self, encoder: ConceptEncoder, bank: FeatureBank):
        self.encoder, self.bank = encoder, bank
        self.logit_scale = encoder.parts.logit_scale

    def parameters(self, trainable: str, learn_temperature: bool) -> list[torch.nn.Parameter]:
        if trainable not in ("heads", "image-head"):
            raise InvalidArgument(f"trainable {trainable!r} does not apply to a {encoder_kind(self.encoder)} encoder: its "
                             "texts are MiniLM's own vectors and only the image map trains (heads or image-head)")
        params = list(self.encoder.parts.image_map.parameters())
        self.logit_scale.requires_grad_(learn_temperature)
        return params + ([self.logit_scale] if learn_temperature else [])

    def module(self) -> torch.nn.Module:
        return self.encoder.parts

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        bank = self.bank
        return bank.fuse(ids, lambda rows: bank.text_feats[rows],
                         lambda rows: self.encoder.parts.image_map(bank.image_feats[rows]), towers.TEXT_DIM)

    def train(self, on: bool) -> None:
        self.encoder.parts.train(on)
        if on and self.bank.image_feats is not None and len(self.bank.image_feats):
            self.encoder.fit_gate(self.bank.image_feats)
        if not on:
            self.logit_scale.requires_grad_(True)
            self.encoder.changed()


def encoder_kind(encoder: Encoder) -> str:
    return encoder.config().get("kind", type(encoder).__name__)


class _Params(torch.nn.Module):
    """The trained tensors of an MLLM under checkpoint-safe names (no dots)."""

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        super().__init__()
        for name, p in named.items():
            self.register_parameter(name.replace(".", "__"), p)


class MllmTrainee:
    def __init__(self, encoder, bank: FeatureBank):
        self.encoder, self.bank = encoder, bank
        self.logit_scale = encoder.logit_scale
        self._texts: list[str] = []
        self._images: list[str] = []
        self._pixels: dict[int, torch.Tensor] = {}

    def parameters(self, trainable: str, learn_temperature: bool) -> list[torch.nn.Parameter]:
        if trainable != "lora":
            raise InvalidArgument(f"trainable {trainable!r} does not apply to an hf-mllm encoder: use lora")
        params = self.encoder.trainable_parameters(learn_temperature)
        for p in params:
            p.requires_grad_(True)
        return params

    def module(self) -> torch.nn.Module:
        named = {n: p for n, p in self.encoder.language_model.named_parameters() if "lora_" in n}
        return _Params({**named, "logit_scale": self.encoder.logit_scale})

    def _prepared(self, item: int) -> Prepared:
        if len(self._texts) != len(self.bank.texts):
            self._texts = list(self.bank.texts)
        if len(self._images) != len(self.bank.images):
            self._images = list(self.bank.images)
        t, i = self.bank.item_text[item], self.bank.item_image[item]
        image = None
        if i >= 0:
            if i not in self._pixels:
                self._pixels[i] = self.encoder.prepare(Item(image=self._images[i])).image
            image = self._pixels[i]
        return Prepared(self._texts[t] if t >= 0 else None, image)

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        return self.encoder.forward([self._prepared(int(i)) for i in ids])

    def train(self, on: bool) -> None:
        self.encoder.model.train(on)
        if not on:
            for p in self.encoder.model.parameters():
                p.requires_grad_(False)
            self.encoder._changed()


def trainee_for(encoder: Encoder, bank: FeatureBank) -> LitTrainee | ConceptTrainee | MllmTrainee:
    from umr.retrieval.encoders.mllm import MllmEncoder

    if isinstance(encoder, LitEncoder):
        return LitTrainee(encoder, bank)
    if isinstance(encoder, ConceptEncoder):
        return ConceptTrainee(encoder, bank)
    if isinstance(encoder, MllmEncoder):
        return MllmTrainee(encoder, bank)
    raise InvalidArgument(f"{encoder.spec} cannot be trained: recipes train LiT encoders (lit-base, lit-init, "
                     "lit-concept-init, a folder `umr train` saved) and hf-mllm encoders")
