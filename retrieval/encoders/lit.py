"""LiT-style dual encoder: locked pretrained towers, trained linear heads into one space.

A saved LiT encoder is a directory: `umr_encoder.json` (type, dims, towers, provenance) and
`heads.safetensors` (the two projections and the learned temperature).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from retrieval.encoders import towers
from retrieval.encoders.base import EncoderError
from retrieval.encoders.tower_encoder import TowerEncoder

CONFIG_FILE = "umr_encoder.json"
HEADS_FILE = "heads.safetensors"
INIT_TEMPERATURE = 0.05


class LitHeads(torch.nn.Module):
    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.text_proj = torch.nn.Linear(towers.TEXT_DIM, dim)
        self.image_proj = torch.nn.Linear(towers.IMAGE_DIM, dim)
        for lin in (self.text_proj, self.image_proj):
            torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5, generator=g)
            torch.nn.init.zeros_(lin.bias)
        # Learnable temperature as a log-scale, CLIP style: logits = exp(s) * cos.
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / INIT_TEMPERATURE)))))


class LitEncoder(TowerEncoder):
    def __init__(self, heads: LitHeads, spec: str, provenance: dict | None = None, digest: str | None = None):
        super().__init__()
        self.heads = heads.eval()
        self.spec = spec
        self.dim = heads.text_proj.out_features
        self.provenance = provenance or {}
        self._digest = digest

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def fresh(cls, dim: int = 256, seed: int = 0, spec: str | None = None) -> "LitEncoder":
        return cls(LitHeads(dim, seed), spec or f"lit-init:{dim}:{seed}")

    @classmethod
    def load(cls, directory: str | Path, spec: str | None = None) -> "LitEncoder":
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        if cfg.get("type") != "lit":
            raise EncoderError(f"{directory} holds a {cfg.get('type')!r} encoder, not lit")
        if cfg.get("text_tower") != towers.TEXT_TOWER or cfg.get("image_tower") != towers.IMAGE_TOWER:
            raise EncoderError(f"{directory} needs towers {cfg.get('text_tower')}/{cfg.get('image_tower')}, "
                               f"this umr has {towers.TEXT_TOWER}/{towers.IMAGE_TOWER}")
        heads = LitHeads(int(cfg["dim"]))
        heads.load_state_dict(load_file(str(directory / HEADS_FILE)))
        return cls(heads, spec or str(directory), cfg.get("provenance"))

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(directory / HEADS_FILE))
        os.chmod(directory / HEADS_FILE, 0o644)
        cfg = {"type": "lit", **self.config(), "provenance": provenance or self.provenance}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    # -- Encoder --------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": "lit", "dim": self.dim, "text_tower": towers.TEXT_TOWER, "image_tower": towers.IMAGE_TOWER,
                "image_size": towers.IMAGE_SIZE, "image_mean": towers.IMAGE_MEAN, "image_std": towers.IMAGE_STD,
                "max_tokens": towers.MAX_TOKENS}

    def weights_digest(self) -> str:
        if self._digest is None:
            import hashlib

            h = hashlib.sha256()
            for k, v in sorted(self.heads.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().numpy().tobytes())
            self._digest = h.hexdigest()
        return f"{self.text.digest[:16]}:{self.image.digest[:16]}:{self._digest[:32]}"

    def text_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.heads.text_proj(feats)

    def image_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.heads.image_proj(feats)
