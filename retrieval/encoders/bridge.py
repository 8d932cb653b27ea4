"""`lit-bridge`: the zero-shot concept-bridge encoder in MiniLM's own space.

Texts are all-MiniLM-L6-v2 sentence embeddings, unchanged (256 tokens, MiniLM's own setting), so
text->text search is exactly MiniLM's. Images land in the same space through the ImageNet
classifier's top concepts (retrieval/encoders/concept_bridge.py). No training: it knows every
ImageNet concept and nothing about people or actions (docs/zero-shot.md).

A folder holds `umr_encoder.json` (type lit-bridge, top k, temperature) and `bridge.safetensors`
(the class embeddings, so loading needs no minute of MiniLM and the fingerprint pins them).
Build one with `python -m umr.retrieval.encoders.bridge DIR`.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from umr.retrieval.encoders import concept_bridge, towers
from umr.retrieval.encoders.base import EncoderError
from umr.retrieval.encoders.tower_encoder import TowerEncoder, read_folder_config

WEIGHTS_FILE = "bridge.safetensors"
TEXT_MAX_TOKENS = 256  # all-MiniLM-L6-v2's own limit: text search is MiniLM's, unchanged


class BridgeEncoder(TowerEncoder):
    text_max_tokens = TEXT_MAX_TOKENS

    def __init__(self, class_emb: torch.Tensor, spec: str, top_k: int = concept_bridge.TOP_K,
                 temperature: float = concept_bridge.TEMPERATURE, provenance: dict | None = None):
        super().__init__()
        if class_emb.shape != (1000, towers.TEXT_DIM):
            raise EncoderError(f"class embeddings must be 1000 x {towers.TEXT_DIM}, got {tuple(class_emb.shape)}")
        self.class_emb = class_emb.float().contiguous()
        self.spec = spec
        self.dim = towers.TEXT_DIM
        self.top_k, self.temperature = int(top_k), float(temperature)
        self.provenance = provenance or {}
        self._digest: str | None = None

    @classmethod
    def build(cls, spec: str = "lit-bridge") -> "BridgeEncoder":
        """Class embeddings computed from timm's ImageNet synonyms and definitions by MiniLM."""
        return cls(concept_bridge.class_embeddings(towers.text_tower()), spec,
                   provenance={"class_texts": "timm ImageNetInfo: 'a photo of a {synonym}.' and '{name}: {definition}.'"})

    @classmethod
    def load(cls, directory: str | Path, spec: str | None = None) -> "BridgeEncoder":
        cfg = read_folder_config(directory, "lit-bridge")
        weights = load_file(str(Path(directory) / WEIGHTS_FILE))
        return cls(weights["class_emb"], spec or str(directory), cfg["top_k"], cfg["temperature"], cfg.get("provenance"))

    def save(self, directory: str | Path) -> Path:
        return self.write_folder(directory, "lit-bridge", WEIGHTS_FILE, {"class_emb": self.class_emb}, self.provenance)

    def config(self) -> dict:
        return {"kind": "lit-bridge", "dim": self.dim, **self.tower_config(), "top_k": self.top_k,
                "temperature": self.temperature}

    def weights_digest(self) -> str:
        if self._digest is None:
            self._digest = hashlib.sha256(self.class_emb.numpy().tobytes()).hexdigest()
        return f"{self.text.digest[:16]}:{self.image.digest[:16]}:{self._digest[:32]}"

    def text_head(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def image_head(self, feats: torch.Tensor) -> torch.Tensor:
        return concept_bridge.bridge(self.image.class_logits(feats), self.class_emb, self.top_k, self.temperature)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m umr.retrieval.encoders.bridge OUT_DIR")
    print(BridgeEncoder.build().save(sys.argv[1]))
