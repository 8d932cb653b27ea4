"""The encoder interface shared by every backbone, with fusion and instructions done once here.

Encoding is split in two so the indexing pipeline can overlap them: `prepare` (decode and
preprocess, CPU-bound, runs in worker processes or threads) and `embed` (the model forward on a batch).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from umr.index.atomic import file_sha256
from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import device_decode
from umr.retrieval import numerics
from umr.retrieval.device import current as current_device
from umr.retrieval.device import stack_batch
from umr.retrieval.images import DEFAULT_LIMITS, ImageLimits, open_image
from umr.retrieval.items import Item


def quiet_transformers() -> None:
    """Model loading progress bars and hub warnings are noise in a CLI and in logs."""
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


class EncoderError(InvalidArgument):
    """An encoder spec cannot be resolved or loaded; the message says what to give instead."""


@dataclass
class Prepared:
    """An item ready for the forward pass: tokenisable text and/or a preprocessed image tensor."""

    text: str | None
    image: torch.Tensor | None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states, padding excluded (sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def sha256_file(path: str | Path, _cache: dict = {}) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        _cache[key] = file_sha256(path)
    return _cache[key]


def check_role(role: str) -> None:
    if role not in ("document", "query"):
        raise InvalidArgument("role must be 'document' or 'query'")


def fuse(n: int, dim: int, img_idx: list[int], img: torch.Tensor | None, txt_idx: list[int],
         txt: torch.Tensor | None) -> np.ndarray:
    """One unit row per item from its image and/or text vectors: an image+text item is the
    normalised sum of its normalised parts (UniIR's CLIP_SF score fusion)."""
    out = torch.zeros(n, dim)
    if img_idx:
        out[img_idx] += l2_normalize(img)
    if txt_idx:
        out[txt_idx] += l2_normalize(txt)
    return l2_normalize(out).numpy().astype(np.float32)


def with_instruction(text: str | None, instruction: str | None) -> str | None:
    """Task instructions are prefixed to the query text only (UniIR / U-MARVEL)."""
    if not instruction:
        return text
    instruction = instruction.strip()
    return f"{instruction} {text.strip()}" if text and text.strip() else instruction


@dataclass(frozen=True)
class Preparer:
    """What `Encoder.prepare` needs, without the model: decoding and preprocessing can then run
    in processes that never load the weights (a Ray build's preprocessing tasks)."""

    spec: str
    preprocess: Callable[[Image.Image], torch.Tensor]
    image_size: int
    supports_images: bool
    supports_texts: bool
    decode_on_device: bool = False  # JPEGs go to the device decoder (retrieval/encoders/device_decode.py)
    # The encoder's device_resize_crop: where set, plain JPEGs are decoded straight into a tensor
    # on this CPU and preprocessed by it (device_decode.decoded_here), PIL's pixels without PIL.
    resize_crop: Callable[[torch.Tensor], torch.Tensor] | None = None

    def prepare(self, item: Item, limits: ImageLimits = DEFAULT_LIMITS) -> Prepared:
        """A document's Prepared, as its encoder's `prepare(item, "document")` gives it."""
        return self.parts(item, item.text if item.text and item.text.strip() else None, limits)

    def check_decoders(self) -> None:
        """Run in a parent before it forks its workers: they then inherit the answer of the
        libjpeg check (device_decode.decoders_agree) instead of each paying for it."""
        if self.resize_crop is not None and not self.decode_on_device:
            device_decode.decoders_agree()

    def parts(self, item: Item, text: str | None, limits: ImageLimits) -> Prepared:
        image = None
        if item.image is not None:
            if not self.supports_images:
                raise EncoderError(f"encoder {self.spec} embeds text only; item {item.id!r} has an image")
            if isinstance(item.image, torch.Tensor):
                image = item.image
            else:
                if self.decode_on_device:
                    image = device_decode.for_device(item.image, limits)
                elif self.resize_crop is not None:
                    image = device_decode.decoded_here(item.image, limits, self.image_size, self.resize_crop)
                if image is None:
                    image = self.preprocess(open_image(item.image, limits, min_side=self.image_size))
        if text is not None and not self.supports_texts:
            if image is None:
                raise EncoderError(f"encoder {self.spec} embeds images only; item {item.id!r} is text")
            text = None
        if text is None and image is None:
            raise InvalidArgument(f"item {item.id!r} has neither text nor image")
        return Prepared(text, image)


class Encoder(ABC):
    spec: str
    dim: int
    supports_images = True
    supports_texts = True
    image_size = 224
    # Whether the forward passes honour --precision float16 (retrieval/numerics.py).
    reduced_precision = False
    # uint8 CHW pixels on any device -> the preprocessed image, where preprocessing is exactly
    # that after decoding; what --image-decode device needs (retrieval/encoders/device_decode.py).
    device_resize_crop: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- what each backbone implements ---------------------------------------------------
    @abstractmethod
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> CHW tensor the image tower takes (uint8 or float)."""

    @abstractmethod
    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) preprocessed -> (B, dim), not yet normalised."""

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (B, dim), not yet normalised."""

    @abstractmethod
    def config(self) -> dict:
        """Everything that defines the embedding function except the weights."""

    @abstractmethod
    def weights_digest(self) -> str:
        """A hash of the weights, so two encoders with equal configs still differ if trained."""

    # -- shared ---------------------------------------------------------------------------
    def with_instruction(self, text: str | None, instruction: str | None) -> str | None:
        """How a query's text carries its task instruction (MLLMs mark it for pooling)."""
        return with_instruction(text, instruction)

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            blob = json.dumps({"config": self.config(), "weights": self.weights_digest(), "dim": self.dim,
                               "normalized": True}, sort_keys=True)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint

    def numerics(self) -> dict:
        """The options in force that change this encoder's vectors (retrieval/numerics.py);
        one it cannot honour is refused rather than ignored."""
        chosen = numerics.current()
        if chosen.precision != "float32" and not self.reduced_precision:
            raise EncoderError(f"--precision {chosen.precision}: encoder {self.spec} runs at its own precision; "
                               "use --precision float32")
        out = chosen.record()
        if not self.supports_images:
            out.pop("image_decode", None)
        elif "image_decode" in out and self.device_resize_crop is None:
            raise EncoderError(f"--image-decode device: encoder {self.spec}'s image preprocessing runs on the CPU "
                               "only; use --image-decode cpu")
        return out

    @property
    def vectors_fingerprint(self) -> str:
        """`fingerprint` with the numerics in force folded in: equal only where the vectors are
        the same to the last bit, which a resumed build must be."""
        extra = self.numerics()
        if not extra:
            return self.fingerprint
        blob = json.dumps({"fingerprint": self.fingerprint, "numerics": extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def record(self) -> dict:
        """What an index manifest stores about the encoder that filled it. Queries match it by
        `fingerprint` (any numerics: they agree within cosine 0.999); a build resumes only with
        the same `vectors_fingerprint`."""
        extra = self.numerics()
        return {"spec": self.spec, "fingerprint": self.fingerprint, "dim": self.dim, "config": self.config(),
                "query_modalities": self.query_modalities,
                **({"numerics": extra, "vectors_fingerprint": self.vectors_fingerprint} if extra else {})}

    @property
    def query_modalities(self) -> list[str]:
        """What it embeds, as the query modalities an index can answer with it."""
        return [m for m, ok in (("text", self.supports_texts), ("image", self.supports_images),
                                ("image,text", self.supports_texts and self.supports_images)) if ok]

    def prepare(self, item: Item, role: str = "document", instruction: str | None = None,
                limits: ImageLimits = DEFAULT_LIMITS) -> Prepared:
        text = item.text if item.text and item.text.strip() else None
        if role == "query":
            text = self.with_instruction(text, instruction)
        return self._preparer_with(self.preprocess_image).parts(item, text, limits)

    def decodes_on_device(self) -> bool:
        return "image_decode" in self.numerics()

    def image_preprocessor(self):
        """A picklable image preprocessing function that holds none of the model's weights, or
        None when preprocessing needs the model (processes that only prepare then load it)."""
        return None

    def preparer(self) -> "Preparer | None":
        """`prepare` for documents without the model (see Preparer), or None when this
        encoder cannot prepare without it."""
        fn = self.image_preprocessor()
        if fn is None or type(self).prepare is not Encoder.prepare:
            return None
        return self._preparer_with(fn)

    def _preparer_with(self, preprocess) -> "Preparer":
        """The one place an encoder's settings become a Preparer's, for queries here and for workers."""
        return Preparer(self.spec, preprocess, self.image_size, self.supports_images, self.supports_texts,
                        self.decodes_on_device(), self.device_resize_crop)

    @torch.inference_mode()
    def embed(self, prepared: list[Prepared]) -> np.ndarray:
        """Batched forward over prepared items; image+text items are fused as CLIP_SF does:
        the normalised sum of the normalised image and text embeddings."""
        img_idx = [i for i, p in enumerate(prepared) if p.image is not None]
        txt_idx = [i for i, p in enumerate(prepared) if p.text is not None]
        img = self.embed_images(self.image_batch([prepared[i].image for i in img_idx])) if img_idx else None
        txt = self.embed_texts([prepared[i].text for i in txt_idx]) if txt_idx else None
        return fuse(len(prepared), self.dim, img_idx, img, txt_idx, txt)

    def image_batch(self, images: list) -> torch.Tensor:
        """Prepared images as one batch; JPEGs left for the device decoded there."""
        if not any(isinstance(x, device_decode.EncodedJpeg) for x in images):
            return stack_batch(images)
        checked = ImageLimits(max_bytes=1 << 62, max_pixels=1 << 62, max_aspect=1e9)  # passed when prepared

        def on_cpu(jpeg):
            return device_decode.decode_on_cpu(jpeg, self.preprocess_image, checked)

        return device_decode.image_batch(images, current_device(), self.device_resize_crop, on_cpu)

    def encode(self, items: list[Item], role: str = "document", instruction: str | None = None,
               batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 rows, one per item; images decode in worker threads while the
        model runs. An item that cannot be prepared raises what `prepare` raised."""
        from umr.retrieval.encoders.prefetch import prefetch_batches

        check_role(role)
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        rows = []
        for chunk, prepared in prefetch_batches(chunks, lambda it: self.prepare(it, role, instruction)):
            for p in prepared:
                if isinstance(p, Exception):
                    raise p
            rows.append(self.embed(prepared))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def encode_texts(self, texts: list[str], role: str = "query", instruction: str | None = None) -> np.ndarray:
        return self.encode([Item(text=t) for t in texts], role, instruction)
