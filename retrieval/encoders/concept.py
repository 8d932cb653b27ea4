"""`lit-base` v2: the concept bridge plus a learned map that speaks only where it was trained.

Everything lives in all-MiniLM-L6-v2's own 384-d space. Texts are MiniLM's sentence embeddings,
unchanged (256 tokens), so text->text search is exactly MiniLM's. An image is

    normalize( bridge(x) + weight * gate(x) * normalize(map(x)) )

where `bridge` is the zero-shot ConSE vector over the ImageNet classifier's top concepts
(retrieval/encoders/concept_bridge.py), `map` a linear map of the pooled features trained by
`umr train` against MiniLM's caption vectors (LiT: the text tower stays locked), and `gate` how
much the photo looks like the photos the map was trained on (retrieval/encoders/domain_gate.py).
In domain the map dominates (people and actions, which are no ImageNet class); elsewhere the
bridge answers alone. Why this and not interpolated weights (WiSE-FT) or a score mix:
docs/zero-shot.md.

A folder holds `umr_encoder.json` (type lit-concept, top k, temperature, map weight, gate width)
and `concept.safetensors` (the map, the gate's anchor photos and centre, and the class
embeddings where they are not lit-bridge's own). The stored form (`stored_tensors`) is lossless:
the tensors read back are the trained ones bit for bit, so the fingerprint does not depend on it.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from umr.retrieval.encoders import concept_bridge, domain_gate, towers
from umr.retrieval.encoders.base import EncoderError
from umr.retrieval.encoders.tower_encoder import TowerEncoder, read_folder_config

KIND = "lit-concept"
WEIGHTS_FILE = "concept.safetensors"
TEXT_MAX_TOKENS = 256  # all-MiniLM-L6-v2's own limit
TOP_K = 20
MAP_WEIGHT = 2.0
INIT_TEMPERATURE = 0.05


class ConceptParts(torch.nn.Module):
    """The tensors of a concept encoder; only `image_map` and `logit_scale` train."""

    def __init__(self, class_emb: torch.Tensor, seed: int = 0):
        super().__init__()
        if class_emb.shape != (1000, towers.TEXT_DIM):
            raise EncoderError(f"class embeddings must be 1000 x {towers.TEXT_DIM}, got {tuple(class_emb.shape)}")
        g = torch.Generator().manual_seed(seed)
        self.image_map = torch.nn.Linear(towers.IMAGE_DIM, towers.TEXT_DIM)
        torch.nn.init.normal_(self.image_map.weight, std=towers.IMAGE_DIM ** -0.5, generator=g)
        torch.nn.init.zeros_(self.image_map.bias)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.register_buffer("class_emb", class_emb.float().contiguous())
        self.register_buffer("anchors", torch.zeros(0, towers.IMAGE_DIM))  # no anchors: the gate is shut
        self.register_buffer("gate_center", torch.tensor(1.0))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ConceptParts":
        tensors = loaded_tensors(tensors)
        parts = cls(tensors["class_emb"])
        parts.anchors = tensors["anchors"].float().contiguous()
        parts.load_state_dict(tensors)
        return parts


def _shipped_class_embeddings() -> torch.Tensor:
    from umr.retrieval.encoders.bridge import WEIGHTS_FILE as BRIDGE_FILE
    from umr.retrieval.encoders.builtin import builtin_path

    path = builtin_path("lit-bridge") / BRIDGE_FILE
    if not path.exists():
        raise EncoderError(f"the concept bridge's class embeddings are missing from {path}; reinstall umr")
    return load_file(str(path))["class_emb"]


def stored_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a folder keeps of the parts. The class embeddings are left out when they are
    lit-bridge's (they are read from its file); the gate's anchors, pooled ReLU6 features with
    a third of their entries zero, are kept as a bit mask and the non-zero values. That keeps
    the shipped lit-base under the repository's 5 MB per file."""
    out = {k: v.detach().contiguous() for k, v in state.items() if k not in ("class_emb", "anchors")}
    if not torch.equal(state["class_emb"], _shipped_class_embeddings()):
        out["class_emb"] = state["class_emb"].contiguous()
    anchors = state["anchors"].contiguous()
    nonzero = (anchors != 0).flatten()
    out["anchors_shape"] = torch.tensor(anchors.shape, dtype=torch.int64)
    out["anchors_mask"] = torch.from_numpy(np.packbits(nonzero.numpy()))
    out["anchors_values"] = anchors.flatten()[nonzero]
    return out


def loaded_tensors(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts' tensors from either stored form (folders written before `stored_tensors`
    hold them whole)."""
    out = dict(stored)
    if "class_emb" not in out:
        out["class_emb"] = _shipped_class_embeddings()
    if "anchors" not in out:
        shape = tuple(int(x) for x in out.pop("anchors_shape"))
        n = int(np.prod(shape))
        nonzero = torch.from_numpy(np.unpackbits(out.pop("anchors_mask").numpy(), count=n).astype(bool))
        anchors = torch.zeros(n, dtype=torch.float32)
        anchors[nonzero] = out.pop("anchors_values")
        out["anchors"] = anchors.view(shape)
    return out


class ConceptEncoder(TowerEncoder):
    text_max_tokens = TEXT_MAX_TOKENS

    def __init__(self, parts: ConceptParts, spec: str, top_k: int = TOP_K,
                 temperature: float = concept_bridge.TEMPERATURE, map_weight: float = MAP_WEIGHT,
                 gate_width: float = domain_gate.WIDTH, knn: int = domain_gate.KNN, provenance: dict | None = None):
        super().__init__()
        self.parts = parts.eval()
        self.spec = spec
        self.dim = towers.TEXT_DIM
        self.top_k, self.temperature, self.map_weight = int(top_k), float(temperature), float(map_weight)
        self.gate_width, self.knn = float(gate_width), int(knn)
        self.provenance = provenance or {}
        self._digest: str | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def fresh(cls, seed: int = 0, spec: str | None = None) -> "ConceptEncoder":
        """The bridge with an untrained map and a shut gate: where `umr train` starts."""
        return cls(ConceptParts(_shipped_class_embeddings(), seed), spec or f"lit-concept-init:{seed}")

    @classmethod
    def load(cls, directory: str | Path, spec: str | None = None) -> "ConceptEncoder":
        cfg = read_folder_config(directory, KIND)
        parts = ConceptParts.from_tensors(load_file(str(Path(directory) / WEIGHTS_FILE)))
        return cls(parts, spec or str(directory), cfg["top_k"], cfg["temperature"], cfg["map_weight"],
                   cfg["gate_width"], cfg["knn"], cfg.get("provenance"))

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        return self.write_folder(directory, KIND, WEIGHTS_FILE, stored_tensors(self.parts.state_dict()),
                                 provenance or self.provenance)

    def fit_gate(self, train_image_feats: torch.Tensor) -> None:
        """Anchor the gate on the photos the map trains on, added to those it was trained on
        before: continued training on a new domain (`umr train --encoder lit-base`) opens the
        gate there without shutting it on the photos of earlier rounds."""
        feats = torch.cat([self.parts.anchors, train_image_feats.float()]) if len(self.parts.anchors) else train_image_feats
        anchors = domain_gate.pick_anchors(feats)
        center = domain_gate.fit_center(anchors, self.knn)
        self.parts.anchors = anchors
        self.parts.gate_center = torch.tensor(center)
        self.changed()

    def changed(self) -> None:
        self._digest = None
        self.__dict__.pop("_fingerprint", None)

    # -- Encoder --------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": KIND, "dim": self.dim, **self.tower_config(), "top_k": self.top_k,
                "temperature": self.temperature, "map_weight": self.map_weight, "gate_width": self.gate_width,
                "knn": self.knn, "anchors": len(self.parts.anchors)}

    def weights_digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for k, v in sorted(self.parts.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return f"{self.text.digest[:16]}:{self.image.digest[:16]}:{self._digest[:32]}"

    def text_head(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def gate(self, feats: torch.Tensor) -> torch.Tensor:
        return domain_gate.gate(feats, self.parts.anchors, float(self.parts.gate_center), self.gate_width, self.knn)

    def image_head(self, feats: torch.Tensor) -> torch.Tensor:
        b = concept_bridge.bridge(self.image.class_logits(feats), self.parts.class_emb, self.top_k, self.temperature)
        learned = F.normalize(self.parts.image_map(feats), dim=-1)
        return F.normalize(b + self.map_weight * self.gate(feats)[:, None] * learned, dim=-1)
