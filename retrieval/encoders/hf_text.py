"""Text-only encoders from a local Hugging Face folder, mean-pooled (sentence-transformers style)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from umr.retrieval.encoders.base import Encoder, EncoderError, mean_pool, quiet_transformers, sha256_file
from umr.retrieval.encoders.serial import serial
from umr.retrieval.encoders.token_ids import BulkTokenizer


class HfTextEncoder(Encoder):
    supports_images = False

    def __init__(self, path: str, spec: str, max_tokens: int = 256):
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()

        p = Path(path)
        if not p.is_dir():
            raise EncoderError(f"hf-text needs a local model folder; {path} is not a directory")
        try:
            self.tokenizer = serial(AutoTokenizer.from_pretrained(str(p)))
            self.tokens = BulkTokenizer(self.tokenizer)
            self.model = AutoModel.from_pretrained(str(p)).eval()
        except Exception as e:
            raise EncoderError(f"could not load a transformers model from {path}: {str(e)[:200]}") from None
        self.spec = spec
        self.path = p
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        self._digest = ":".join(sha256_file(w)[:16] for w in weights) or "none"

    def config(self) -> dict:
        return {"kind": "hf-text", "model_type": self.model.config.model_type, "pooling": "mean",
                "max_tokens": self.max_tokens}

    def weights_digest(self) -> str:
        return self._digest

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        raise EncoderError(f"{self.spec} embeds text only")

    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        raise EncoderError(f"{self.spec} embeds text only")

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokens.padded(texts, self.max_tokens)
        return mean_pool(self.model(**tok).last_hidden_state, tok["attention_mask"])
