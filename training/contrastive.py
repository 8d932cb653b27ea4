"""One contrastive stage for LiT encoders: symmetric InfoNCE on image-caption pairs.

The towers are locked, so their features are computed once per unique image and caption and
the heads train on cached features: hundreds of epochs cost seconds on a CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retrieval.encoders.lit import LitEncoder
from retrieval.images import open_image
from retrieval.prefetch import prefetch_batches
from training.losses import embedding_distillation, info_nce
from training.pairs import Pair


@dataclass
class ContrastiveConfig:
    epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    symmetric: bool = True
    seed: int = 0
    distill_weight: float = 0.0  # continual: weight of 1 - cos to the frozen previous encoder


def tower_features(encoder: LitEncoder, pairs: list[Pair], progress: Callable | None = None):
    """(image features, caption features, image index per caption), from the locked towers."""
    images = sorted({p.image for p in pairs})
    index = {im: i for i, im in enumerate(images)}
    img_feats = []
    chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
    prep = lambda path: encoder.preprocess_image(open_image(path, min_side=encoder.image_size))  # noqa: E731
    for chunk, tensors in prefetch_batches(chunks, prep):
        for path, t in zip(chunk, tensors):
            if isinstance(t, Exception):
                raise ValueError(f"training image {path}: {t}")
        img_feats.append(encoder.image.features(torch.stack(tensors)))
        if progress:
            progress("images", len(chunk))
    texts = [p.text for p in pairs]
    txt_feats = []
    for i in range(0, len(texts), 256):
        txt_feats.append(encoder.text.features(texts[i : i + 256]))
        if progress:
            progress("captions", len(texts[i : i + 256]))
    owner = torch.tensor([index[p.image] for p in pairs])
    return torch.cat(img_feats), torch.cat(txt_feats), owner


def text_identity(pairs: list[Pair]) -> torch.Tensor | None:
    """Ids equal where caption texts are equal; None when every caption is unique."""
    ids: dict[str, int] = {}
    out = torch.tensor([ids.setdefault(p.text, len(ids)) for p in pairs])
    return None if len(ids) == len(pairs) else out


def train_heads(encoder: LitEncoder, img_feats: torch.Tensor, txt_feats: torch.Tensor, owner: torch.Tensor,
                cfg: ContrastiveConfig, log: Callable[[dict], None] | None = None, teacher: LitEncoder | None = None,
                text_ids: torch.Tensor | None = None) -> list[dict]:
    """Each step takes `batch_size` distinct images, each with one of its captions at random.
    Captions with equal text (`text_ids`, e.g. class names) count as positives of each other.
    With a `teacher` (the previous encoder, frozen), embeddings are also pulled toward its own
    so an update drifts less (QDC's embedding distillation)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    heads = encoder.heads.train()
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    captions_of = [np.flatnonzero(owner.numpy() == i) for i in range(len(img_feats))]
    n_img = len(img_feats)
    steps_per_epoch = max(1, n_img // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(n_img)
        t0, losses = time.perf_counter(), []
        for s in range(steps_per_epoch):
            img_idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            cap_idx = [rng.choice(captions_of[i]) for i in img_idx]
            img = heads.image_proj(img_feats[img_idx])
            txt = heads.text_proj(txt_feats[cap_idx])
            same = None
            if text_ids is not None:
                ids = text_ids[cap_idx]
                same = ids[:, None] == ids[None, :]
            loss = info_nce(txt, img, heads.logit_scale, cfg.symmetric, same)
            if teacher is not None and cfg.distill_weight > 0:
                with torch.no_grad():
                    t_img = teacher.heads.image_proj(img_feats[img_idx])
                    t_txt = teacher.heads.text_proj(txt_feats[cap_idx])
                loss = loss + cfg.distill_weight * (embedding_distillation(img, t_img) + embedding_distillation(txt, t_txt))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
               "temperature": float(1 / heads.logit_scale.detach().exp().clamp(max=100)),
               "pairs_per_s": steps_per_epoch * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)}
        history.append(rec)
        if log:
            log(rec)
    heads.eval()
    encoder.__dict__.pop("_fingerprint", None)
    encoder._digest = None
    return history


def save_trained(encoder: LitEncoder, out: str | Path, cfg: ContrastiveConfig, data: dict, history: list[dict],
                 command: str) -> Path:
    provenance = {"trained_by": "umr train", "command": command, "stage": "contrastive", "config": asdict(cfg),
                  "data": data, "final": history[-1] if history else None,
                  "terms": "Weights trained on Flickr8k inherit its research-only terms." if "flickr" in json.dumps(data).lower() else None}
    path = encoder.save(out, provenance)
    (Path(out) / "training_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return path
