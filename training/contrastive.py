"""One training stage: InfoNCE with in-batch and mined negatives, or
distillation from teacher lists; LiT heads over cached tower features, or LoRA on an MLLM.

The towers are locked, so their features are computed once per distinct text and image
(training/examples.py) and hundreds of epochs cost seconds on a CPU.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders.base import Encoder
from umr.retrieval.encoders.lit import LitEncoder
from umr.training import checkpoints, distributed
from umr.training.examples import Example, FeatureBank
from umr.training.losses import embedding_distillation, info_nce, listwise_kl, margin_mse
from umr.training.trainees import trainee_for


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
    trainable: str = "heads"  # heads | text-head | image-head (LiT); lora (hf-mllm)
    temperature: float | None = None  # reset the learnable temperature to this at the start
    learn_temperature: bool = True
    kind: str = "image-caption"  # or caption-caption: another caption of the same image is the positive
    loss: str = "infonce"  # infonce | kl | margin-mse (the last two over teacher lists)
    hard_negatives: int = 0  # mined negatives per query added to the candidates


def _scheduler(opt, cfg: ContrastiveConfig, total: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                                                   pct_start=0.1)
    warm = max(1, total // 20)
    if cfg.schedule == "cosine":
        f = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))  # noqa: E731
    else:
        f = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train_heads(encoder: LitEncoder, img_feats: torch.Tensor, txt_feats: torch.Tensor, owner: torch.Tensor,
                cfg: ContrastiveConfig, log: Callable[[dict], None] | None = None, teacher: LitEncoder | None = None,
                text_ids: torch.Tensor | None = None, checkpoint: str | Path | None = None) -> list[dict]:
    """Pairs given as features (caption j belongs to image owner[j]); captions with equal
    `text_ids` (class names) are one item, so they count as positives of each other."""
    bank = FeatureBank.from_features(txt_feats, img_feats)
    n_txt = len(txt_feats)
    item_of = np.arange(n_txt)
    if text_ids is not None:
        first: dict[int, int] = {}
        item_of = np.array([first.setdefault(int(t), j) for j, t in enumerate(text_ids)])
    caps = [[] for _ in range(len(img_feats))]
    for j, i in enumerate(owner.tolist()):
        caps[i].append(int(item_of[j]))
    two = cfg.kind == "caption-caption"
    examples = [Example(np.array(c), np.array([], dtype=np.int64) if two else np.array([n_txt + i]), np.array([], dtype=np.int64))
                for i, c in enumerate(caps) if len(c) >= (2 if two else 1)]
    return train_examples(encoder, bank, examples, cfg, log, teacher, checkpoint)


def _draw(ex: Example, rng: np.random.Generator) -> tuple[int, int]:
    """(query item, positive item) for one step. The draws keep the order the pair trainer has
    always used (one caption per image), so earlier recipes reproduce."""
    if len(ex.positives) == 0:
        a, b = rng.choice(ex.queries, 2, replace=False)
        return int(a), int(b)
    q = int(rng.choice(ex.queries))
    p = int(ex.positives[0]) if len(ex.positives) == 1 else int(rng.choice(ex.positives))
    return q, p


def _positive_sets(batch: list[Example], drawn: list[tuple[int, int]]) -> list[set[int]]:
    out = []
    for ex, (q, _) in zip(batch, drawn):
        out.append(set(ex.positives.tolist()) if len(ex.positives) else set(ex.queries.tolist()) - {q})
    return out


def _step_loss(trainee, batch: list[Example], drawn: list[tuple[int, int]], cfg: ContrastiveConfig,
               teacher) -> torch.Tensor:
    embed = lambda ids: distributed.embed_global(trainee.embed, ids)  # noqa: E731
    q_items = np.array([d[0] for d in drawn])
    c_items = np.array([d[1] for d in drawn])
    q = embed(q_items)
    if cfg.loss in ("kl", "margin-mse"):
        return _distill_loss(trainee, batch, q, cfg)
    c = embed(c_items)
    n_items = np.concatenate([ex.negatives[: cfg.hard_negatives] for ex in batch]) if cfg.hard_negatives else np.zeros(0, np.int64)
    n = embed(n_items) if len(n_items) else None
    all_c = np.concatenate([c_items, n_items])
    pos_sets = _positive_sets(batch, drawn)
    same = torch.from_numpy(np.stack([np.isin(all_c, list(ps)) for ps in pos_sets]))
    same[:, : len(batch)] |= torch.from_numpy(q_items[:, None] == q_items[None, :])
    same &= ~torch.eye(len(batch), len(all_c), dtype=torch.bool)
    plain = not same.any() and n is None
    loss = info_nce(q, c, trainee.logit_scale, cfg.symmetric, None if plain else same, n)
    if teacher is not None and cfg.distill_weight > 0:
        with torch.no_grad():
            t_q, t_c = teacher.embed(q_items), teacher.embed(c_items)
        loss = loss + cfg.distill_weight * (embedding_distillation(c, t_c) + embedding_distillation(q, t_q))
    return loss


def _distill_loss(trainee, batch: list[Example], q: torch.Tensor, cfg: ContrastiveConfig) -> torch.Tensor:
    """KL or Margin-MSE over each query's teacher list; no in-batch negatives (U-MARVEL)."""
    width = max(len(ex.teacher_items) for ex in batch)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    scores = torch.zeros(len(batch), width)
    items = np.zeros((len(batch), width), dtype=np.int64)
    for r, ex in enumerate(batch):
        n = len(ex.teacher_items)
        mask[r, :n] = True
        scores[r, :n] = torch.from_numpy(ex.teacher_scores)
        items[r, :n] = ex.teacher_items
        items[r, n:] = ex.teacher_items[0]
    cands = distributed.embed_global(trainee.embed, items.reshape(-1)).reshape(len(batch), width, -1)
    cos = torch.einsum("bd,bld->bl", q, cands)
    if cfg.loss == "kl":
        return listwise_kl(cos, scores, mask, trainee.logit_scale)
    return margin_mse(cos, scores, mask)


def _usable(examples: list[Example], cfg: ContrastiveConfig) -> list[Example]:
    """The examples the configured loss can learn from; refused where that is too few."""
    if cfg.loss in ("kl", "margin-mse"):
        examples = [ex for ex in examples if ex.teacher_items is not None and len(ex.teacher_items) >= 2]
        if not examples:
            raise InvalidArgument(f"loss {cfg.loss} needs teacher lists (`umr reranker score` output); the data has none")
    if cfg.hard_negatives and not any(len(ex.negatives) for ex in examples):
        raise InvalidArgument("hard_negatives is set but no query has mined negatives: run `umr mine` and train on its output")
    if len(examples) < 2:
        raise InvalidArgument(f"training needs at least 2 examples, got {len(examples)}")
    return examples


def _optimizer(trainee, cfg: ContrastiveConfig):
    """AdamW over the trainee's parameter groups, the trainee set to train; (optimizer, parameters)."""
    groups = trainee.parameters(cfg.trainable, cfg.learn_temperature)
    # A trainee may give parameter groups with an `lr_scale` (pretrained layers learn slower than fresh heads).
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in groups]
    trainee.train(True)
    if cfg.temperature is not None:
        with torch.no_grad():
            trainee.logit_scale.fill_(math.log(1 / cfg.temperature))
    opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": cfg.lr * g.get("lr_scale", 1.0)}
                             for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, [p for g in groups for p in g["params"]]


def train_examples(encoder: Encoder, bank: FeatureBank, examples: list[Example], cfg: ContrastiveConfig,
                   log: Callable[[dict], None] | None = None, teacher: Encoder | None = None,
                   checkpoint: str | Path | None = None, trainee=None, progress: bool = False) -> list[dict]:
    """Each step takes `batch_size` distinct examples, each with one query variant and one
    positive drawn at random; the other examples' positives and, with `hard_negatives`, the
    batch's mined negatives are the negatives. Candidates that are labelled positives of a
    query (or share its query text) are never counted as its negatives. With a `teacher` (the
    previous encoder, frozen), embeddings are also pulled toward its own, so an update drifts
    less (QDC's embedding distillation).

    With `checkpoint`, the heads and optimizer are saved there after every epoch, and a rerun
    resumes after the last saved epoch; the random stream is replayed for the finished epochs,
    so a resumed run ends with the same weights as an uninterrupted one.

    Under `torchrun` every rank draws the same batches and embeds a slice of each; see
    training/distributed.py. Only the first rank writes checkpoints. `progress` shows a bar
    over the steps with the running loss and temperature (an MLLM epoch can take hours)."""
    examples = _usable(examples, cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trainee = trainee or trainee_for(encoder, bank)
    teacher = trainee_for(teacher, bank) if teacher is not None else None
    opt, params = _optimizer(trainee, cfg)
    batch_size = min(cfg.batch_size, len(examples))
    steps_per_epoch = max(1, len(examples) // batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.steps is None else min(cfg.steps, cfg.epochs * steps_per_epoch)
    sched = _scheduler(opt, cfg, total)
    history, step, start_epoch = [], 0, 0
    if checkpoint is not None:
        start_epoch, history = checkpoints.restore(checkpoint, trainee.module(), opt)
        for _ in range(min(start_epoch * steps_per_epoch, total)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.step()
            step += 1
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, unit="step", desc="training", file=sys.stderr,
               disable=not (progress and distributed.is_main()), leave=False)
    for epoch in range(cfg.epochs):
        if step >= total:
            break
        order = rng.permutation(len(examples))
        batches = [[examples[i] for i in order[s * batch_size : (s + 1) * batch_size]] for s in range(steps_per_epoch)]
        drawn = [[_draw(ex, rng) for ex in b] for b in batches]
        if epoch < start_epoch:
            continue  # replayed: the draws above keep the random stream where it was
        t0, losses = time.perf_counter(), []
        for batch, picks in zip(batches, drawn):
            if step >= total:
                break
            loss = _step_loss(trainee, batch, picks, cfg, teacher)
            opt.zero_grad()
            loss.backward()
            distributed.average_gradients(params)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", T=f"{float(1 / trainee.logit_scale.detach().exp()):.4f}", refresh=False)
        rec = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)), "lr": float(opt.param_groups[0]["lr"]),
               "temperature": float(1 / trainee.logit_scale.detach().exp().clamp(max=100)),
               "pairs_per_s": len(losses) * batch_size / max(time.perf_counter() - t0, 1e-9)}
        history.append(rec)
        if checkpoint is not None and distributed.is_main():
            checkpoints.save(checkpoint, trainee.module(), opt, epoch + 1, history)
        if log:
            log(rec)
    bar.close()
    trainee.train(False)
    return history


def save_trained(encoder: Encoder, out: str | Path, cfg: ContrastiveConfig, data: dict, history: list[dict],
                 command: str) -> Path:
    provenance = {"trained_by": "umr train", "command": command, "stage": "contrastive", "config": asdict(cfg),
                  "data": data, "final": history[-1] if history else None,
                  "terms": "Weights trained on Flickr8k inherit its research-only terms." if "flickr" in json.dumps(data).lower() else None}
    path = encoder.save(out, provenance)
    (Path(out) / "training_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return path
