"""LiT-style dual encoder: locked pretrained towers, trained linear heads into one space.

A saved LiT encoder is a directory: `umr_encoder.json` (type, dims, towers, provenance) and
`heads.safetensors` (the two projections and the learned temperature).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from umr.retrieval.encoders import towers
from umr.retrieval.encoders.tower_encoder import CONFIG_FILE, TowerEncoder, read_folder_config

__all__ = ["CONFIG_FILE", "HEADS_FILE", "LitEncoder", "LitHeads"]
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
        cfg = read_folder_config(directory, "lit")
        heads = LitHeads(int(cfg["dim"]))
        heads.load_state_dict(load_file(str(Path(directory) / HEADS_FILE)))
        return cls(heads, spec or str(directory), cfg.get("provenance"))

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        return self.write_folder(directory, "lit", HEADS_FILE, self.heads.state_dict(), provenance or self.provenance)

    # -- Encoder --------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": "lit", "dim": self.dim, **self.tower_config()}

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
