"""MLLM embedder for the Qwen2-VL family, as U-MARVEL builds it.

An item is rendered with the chat template (image, then text, in the user turn) and read
by the language model with bidirectional attention; the embedding is the mean of the last
hidden states over every non-padding position except the task instruction, which is wrapped
in `<instruction_start> ... <instruction_end>` so it still conditions the other tokens through
attention without entering the average. Image and text of an image+text item go through one
sequence together (no score fusion).

Training adds LoRA on the language model's linear layers; the vision tower stays frozen. A
trained encoder is a folder: `umr_encoder.json` (type mllm, the base model folder, LoRA
settings, provenance) and `adapter.safetensors` (the LoRA weights and the temperature), so a
7B base is never copied.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders.base import Encoder, EncoderError, Prepared, l2_normalize, quiet_transformers, sha256_file
from umr.retrieval.encoders.serial import serial
from umr.retrieval.images import DEFAULT_LIMITS, ImageLimits, open_image
from umr.retrieval.items import Item

CONFIG_FILE = "umr_encoder.json"
ADAPTER_FILE = "adapter.safetensors"
INSTRUCTION_START, INSTRUCTION_END = "<instruction_start>", "<instruction_end>"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_TEMPERATURE = 0.05
MAX_IMAGE_SIDE = 448  # 256 visual tokens: U-MARVEL-scale budgets, not the processor's multi-megapixel default
TEMPLATE_TOKENS = 64  # the chat template's own tokens, with room to spare


def _device() -> torch.device:
    from umr.retrieval.device import current

    return current()


class MllmEncoder(Encoder):
    def __init__(self, base: str | Path, spec: str, lora: dict | None = None, adapter: dict | None = None,
                 provenance: dict | None = None, max_tokens: int = 1024):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        quiet_transformers()
        base = Path(base)
        if not base.is_dir():
            raise EncoderError(f"hf-mllm needs a local model folder; {base} is not a directory")
        self.device = _device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(str(base))
            self.model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=dtype).to(self.device).eval()
        except Exception as e:
            raise EncoderError(f"could not load a Qwen2-VL style model from {base}: {str(e)[:200]}") from None
        if not hasattr(self.model, "model") or not hasattr(self.model.model, "get_rope_index"):
            raise EncoderError(f"{base}: {type(self.model).__name__} is not a Qwen2-VL family model")
        # The processor tokenises with its own tokenizer: both are called under one lock, since
        # threads share them (retrieval/encoders/serial.py).
        self.tokenizer = serial(self.processor.tokenizer)
        self.processor = serial(self.processor, self.tokenizer.lock)
        self.tokenizer.padding_side = "right"
        self._add_markers()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.base = base.resolve()
        self.spec = spec
        self.max_tokens = max_tokens
        self.provenance = provenance or {}
        self.dim = int(self.model.config.get_text_config().hidden_size)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.lora: dict | None = None
        self._base_digest = ":".join(sha256_file(w)[:16] for w in sorted(base.glob("*.safetensors"))) or "none"
        self._adapter_digest: str | None = None
        side = int(math.sqrt(getattr(self.processor.image_processor, "max_pixels", None)
                             or self.processor.image_processor.size.get("longest_edge", 224 * 224)))
        self.image_size = max(28, min(MAX_IMAGE_SIDE, side))
        self.max_text_tokens = max_tokens - (self.image_size // 28) ** 2 - TEMPLATE_TOKENS
        if lora:
            self.add_lora(**lora)
        if adapter:
            self.load_adapter(adapter)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, spec: str | None = None) -> "MllmEncoder":
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        base = Path(cfg["base"])
        if not base.is_dir():
            raise EncoderError(f"{directory} was trained from the base model {base}, which is not there any more")
        adapter = load_file(str(directory / ADAPTER_FILE)) if (directory / ADAPTER_FILE).exists() else None
        return cls(base, spec or str(directory.resolve()), cfg.get("lora"), adapter, cfg.get("provenance"),
                   cfg.get("max_tokens", 1024))

    def _add_markers(self) -> None:
        """The instruction markers are single tokens. A base that lacks them gets them, with
        embedding rows set to the mean of the vocabulary's (deterministic, so a reload gives
        the same model; the markers are never pooled, so their rows hardly matter). Qwen's
        embedding matrix is padded past its vocabulary, so the new ids usually fit without
        resizing; it is never shrunk."""
        missing = [t for t in (INSTRUCTION_START, INSTRUCTION_END) if t not in self.tokenizer.get_vocab()]
        if missing:
            vocab = len(self.tokenizer)
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            if len(self.tokenizer) > self.model.get_input_embeddings().weight.shape[0]:
                self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            ids = self.tokenizer.convert_tokens_to_ids(missing)
            with torch.no_grad():
                emb = self.model.get_input_embeddings().weight
                emb[ids] = emb[:vocab].mean(0)
        self.start_id = self.tokenizer.convert_tokens_to_ids(INSTRUCTION_START)
        self.end_id = self.tokenizer.convert_tokens_to_ids(INSTRUCTION_END)

    # -- LoRA -----------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, targets: list[str] | None = None,
                 seed: int = 0) -> None:
        """LoRA on the language model only: the vision tower keeps its pretrained features.
        The random A matrices come from `seed`, so a run reproduces and every data-parallel
        rank starts from the same weights."""
        if self.lora is not None:
            raise EncoderError(f"{self.spec} already has a LoRA adapter (r={self.lora['r']}); stages continue it")
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise EncoderError("training or loading LoRA adapters on hf-mllm encoders needs peft: "
                               "pip install 'umr[mllm]'") from None

        targets = list(targets or LORA_TARGETS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
                                    self.language_model)
        self.language_model.to(self.device)
        self.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "seed": seed}
        self._changed()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.language_model.state_dict().items() if "lora_" in k}
        return {**state, "logit_scale": self.logit_scale.detach()}

    def trainable_parameters(self, learn_temperature: bool = True) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.language_model.named_parameters() if "lora_" in n]
        if not params:
            raise EncoderError(f"{self.spec} has no LoRA adapter to train; add one first")
        return params + ([self.logit_scale] if learn_temperature else [])

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        scale = state.pop("logit_scale", None)
        if scale is not None:
            with torch.no_grad():
                self.logit_scale.fill_(float(scale))
        if state:
            if self.lora is None:
                raise EncoderError(f"{self.spec}: adapter weights given but no LoRA settings")
            missing, unexpected = self.language_model.load_state_dict(state, strict=False)
            lora_missing = [k for k in missing if "lora_" in k]
            if unexpected or lora_missing:
                raise EncoderError(f"adapter does not fit {self.base}: {(unexpected or lora_missing)[:3]}")
        self._changed()

    def _changed(self) -> None:
        self.__dict__.pop("_fingerprint", None)
        self._adapter_digest = None

    def save_adapter(self, directory: str | Path) -> Path:
        """The LoRA weights and temperature only; whoever saves writes the JSON beside them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.adapter_state().items()}
        save_file(state, str(directory / ADAPTER_FILE))
        os.chmod(directory / ADAPTER_FILE, 0o644)
        return directory

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        directory = self.save_adapter(directory)
        cfg = {"type": "mllm", "base": str(self.base), "lora": self.lora, "max_tokens": self.max_tokens,
               **{"config": self.config()}, "provenance": provenance or self.provenance}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    # -- Encoder --------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": "hf-mllm", "model_type": self.model.config.model_type, "pooling": "mean, instruction excluded",
                "attention": "bidirectional", "image_pixels": self.image_size ** 2, "max_tokens": self.max_tokens,
                "lora": self.lora}

    def weights_digest(self) -> str:
        if self._adapter_digest is None:
            h = hashlib.sha256()
            for k, v in sorted(self.adapter_state().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            self._adapter_digest = h.hexdigest()[:32]
        return f"{self._base_digest}:{self._adapter_digest}"

    def with_instruction(self, text: str | None, instruction: str | None) -> str | None:
        if not instruction or not instruction.strip():
            return text
        wrapped = f"{INSTRUCTION_START}{instruction.strip()}{INSTRUCTION_END}"
        return f"{wrapped} {text.strip()}" if text and text.strip() else wrapped

    def clip(self, text: str | None) -> str | None:
        """Long texts are cut to the token budget left beside an image, so no item overflows."""
        if text is None:
            return None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= self.max_text_tokens else self.tokenizer.decode(ids[: self.max_text_tokens])

    def prepare(self, item: Item, role: str = "document", instruction: str | None = None,
                limits: ImageLimits = DEFAULT_LIMITS) -> Prepared:
        text = self.clip(item.text) if item.text and item.text.strip() else None
        if role == "query":
            text = self.with_instruction(text, instruction)
        image = None
        if item.image is not None:
            image = item.image if isinstance(item.image, torch.Tensor) else \
                self.preprocess_image(open_image(item.image, limits, min_side=self.image_size))
        if text is None and image is None:
            raise InvalidArgument(f"item {item.id!r} has neither text nor image")
        return Prepared(text, image)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Downscaled to the processor's pixel budget here, in the prepare workers, so the
        batch step only patchifies."""
        scale = math.sqrt(self.image_size ** 2 / max(1, image.width * image.height))
        if scale < 1:
            image = image.resize((max(28, round(image.width * scale)), max(28, round(image.height * scale))),
                                 Image.BICUBIC)
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)

    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.forward([Prepared(None, im) for im in batch])

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.forward([Prepared(t, None) for t in texts])

    @torch.inference_mode()
    def embed(self, prepared: list[Prepared]) -> np.ndarray:
        return self.forward(prepared).numpy().astype(np.float32)

    # -- the forward pass -----------------------------------------------------------------
    def render(self, p: Prepared) -> str:
        return self.chat(self.content(p))

    @staticmethod
    def content(p: Prepared, label: str = "") -> list[dict]:
        """One item as user-turn content: image first, then text (`label` before the text)."""
        return ([{"type": "image"}] if p.image is not None else []) + \
               ([{"type": "text", "text": f"{label}{p.text}"}] if p.text else [])

    def chat(self, content: list[dict], answer_prompt: bool = False) -> str:
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=answer_prompt)

    def inputs(self, texts: list[str], images: list[torch.Tensor]) -> dict:
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        if batch["input_ids"].shape[1] > self.max_tokens:
            raise InvalidArgument(f"an item renders to {batch['input_ids'].shape[1]} tokens, over max_tokens "
                             f"{self.max_tokens}; shorten the text or lower the image budget")
        return {k: v.to(self.device) for k, v in batch.items()}

    def hidden_states(self, batch: dict, bidirectional: bool = True) -> torch.Tensor:
        """Last hidden states. Bidirectional: every position attends to every non-padding one;
        the language model takes a prepared mask as is, so the causal one is never built."""
        core = self.model.model
        ids, am = batch["input_ids"], batch["attention_mask"]
        position_ids, _ = core.get_rope_index(ids, image_grid_thw=batch.get("image_grid_thw"), attention_mask=am,
                                              mm_token_type_ids=batch["mm_token_type_ids"])
        mask = am.bool()
        if bidirectional:
            dtype = core.language_model.embed_tokens.weight.dtype
            bias = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=dtype, device=ids.device)
            bias.masked_fill_(~mask[:, None, None, :], torch.finfo(dtype).min)
            mask = {"full_attention": bias, "sliding_attention": bias}
        else:
            mask = am
        out = core(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                   pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                   mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False)
        return out.last_hidden_state

    def pool_mask(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Non-padding positions outside every instruction span (markers included)."""
        opened = (ids == self.start_id).cumsum(1)
        closed = (ids == self.end_id).cumsum(1)
        inside = (opened > closed) | (ids == self.end_id)
        return attention_mask.bool() & ~inside

    def forward(self, prepared: list[Prepared]) -> torch.Tensor:
        """Unit rows, with gradients when called outside inference mode (training)."""
        batch = self.inputs([self.render(p) for p in prepared], [p.image for p in prepared if p.image is not None])
        hidden = self.hidden_states(batch).float()
        keep = self.pool_mask(batch["input_ids"], batch["attention_mask"]).unsqueeze(-1).float()
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return l2_normalize(pooled).cpu()
