"""One contrastive stage for LiT encoders: symmetric InfoNCE on image-caption pairs.

The towers are locked, so their features are computed once per unique image and caption and
the heads train on cached features: hundreds of epochs cost seconds on a CPU.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retrieval.encoders.lit import LitEncoder, LitHeads
from retrieval.images import open_image
from retrieval.prefetch import prefetch_batches
from training import checkpoints
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
    steps: int | None = None  # stop early after this many optimizer steps
    schedule: str = "onecycle"  # onecycle | cosine (5% warm-up) | constant
    trainable: str = "heads"  # heads | text-head | image-head
    temperature: float | None = None  # reset the learnable temperature to this at the start
    learn_temperature: bool = True
    kind: str = "image-caption"  # or caption-caption: another caption of the same image is the positive


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


def _freeze(heads: LitHeads, cfg: ContrastiveConfig) -> list[torch.nn.Parameter]:
    frozen = {"heads": (), "text-head": ("image_proj",), "image-head": ("text_proj",)}[cfg.trainable]
    params = []
    for name, p in heads.named_parameters():
        p.requires_grad_(not name.startswith(frozen) and (cfg.learn_temperature or name != "logit_scale"))
        if p.requires_grad:
            params.append(p)
    return params


def _scheduler(opt, cfg: ContrastiveConfig, total: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    warm = max(1, total // 20)
    if cfg.schedule == "cosine":
        f = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))  # noqa: E731
    else:
        f = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train_heads(encoder: LitEncoder, img_feats: torch.Tensor, txt_feats: torch.Tensor, owner: torch.Tensor,
                cfg: ContrastiveConfig, log: Callable[[dict], None] | None = None, teacher: LitEncoder | None = None,
                text_ids: torch.Tensor | None = None, checkpoint: str | Path | None = None) -> list[dict]:
    """Each step takes `batch_size` distinct images, each with one of its captions at random.
    Captions with equal text (`text_ids`, e.g. class names) count as positives of each other.
    With a `teacher` (the previous encoder, frozen), embeddings are also pulled toward its own
    so an update drifts less (QDC's embedding distillation).

    With `checkpoint`, the heads and optimizer are saved there after every epoch, and a rerun
    resumes after the last saved epoch; the random stream is replayed for the finished epochs,
    so a resumed run ends with the same weights as an uninterrupted one."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    heads = encoder.heads.train()
    if cfg.temperature is not None:
        with torch.no_grad():
            heads.logit_scale.fill_(math.log(1 / cfg.temperature))
    params = _freeze(heads, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    captions_of = [np.flatnonzero(owner.numpy() == i) for i in range(len(img_feats))]
    two_captions = cfg.kind == "caption-caption"
    usable = np.array([len(c) >= (2 if two_captions else 1) for c in captions_of])
    if two_captions and usable.sum() < cfg.batch_size:
        raise ValueError(f"caption-caption needs {cfg.batch_size} images with 2+ captions; {usable.sum()} have them")
    pool = np.flatnonzero(usable)
    steps_per_epoch = max(1, len(pool) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.steps is None else min(cfg.steps, cfg.epochs * steps_per_epoch)
    sched = _scheduler(opt, cfg, total)
    history, step, start_epoch = [], 0, 0
    if checkpoint is not None:
        start_epoch, history = checkpoints.restore(checkpoint, heads, opt)
        for _ in range(min(start_epoch * steps_per_epoch, total)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.step()
            step += 1
    for epoch in range(cfg.epochs):
        if step >= total:
            break
        order = pool[rng.permutation(len(pool))]
        batches = [order[s * cfg.batch_size : (s + 1) * cfg.batch_size] for s in range(steps_per_epoch)]
        if two_captions:
            drawn = [[rng.choice(captions_of[i], 2, replace=False) for i in b] for b in batches]
        else:
            drawn = [[[rng.choice(captions_of[i])] for i in b] for b in batches]
        if epoch < start_epoch:
            continue  # replayed: the draws above keep the random stream where it was
        t0, losses = time.perf_counter(), []
        for img_idx, caps in zip(batches, drawn):
            if step >= total:
                break
            caps = np.array(caps)
            txt = heads.text_proj(txt_feats[caps[:, 0]])
            cand = heads.text_proj(txt_feats[caps[:, 1]]) if two_captions else heads.image_proj(img_feats[img_idx])
            same = None
            if text_ids is not None:
                ids = text_ids[caps[:, 0]]
                same = ids[:, None] == ids[None, :]
            loss = info_nce(txt, cand, heads.logit_scale, cfg.symmetric, same)
            if teacher is not None and cfg.distill_weight > 0:
                with torch.no_grad():
                    t_txt = teacher.heads.text_proj(txt_feats[caps[:, 0]])
                    t_cand = (teacher.heads.text_proj(txt_feats[caps[:, 1]]) if two_captions
                              else teacher.heads.image_proj(img_feats[img_idx]))
                loss = loss + cfg.distill_weight * (embedding_distillation(cand, t_cand) + embedding_distillation(txt, t_txt))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
        rec = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)), "lr": float(opt.param_groups[0]["lr"]),
               "temperature": float(1 / heads.logit_scale.detach().exp().clamp(max=100)),
               "pairs_per_s": len(losses) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)}
        history.append(rec)
        if checkpoint is not None:
            checkpoints.save(checkpoint, heads, opt, epoch + 1, history)
        if log:
            log(rec)
    heads.eval()
    for p in heads.parameters():
        p.requires_grad_(True)
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
