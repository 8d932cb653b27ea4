"""Training the cross-encoder re-ranker, and scoring teacher lists for distillation.

Training is pointwise, as U-MARVEL's, for both re-rankers (the LiT cross-encoder and the MLLM
Yes/No one): each query with one labelled positive (yes) and one negative drawn from its mined
list (no), binary cross-entropy on the logit. Teacher lists are
the student's top candidates for a sample of training queries with the fused score
cos + w * P(yes); a `kl` or `margin-mse` stage distils them into the student.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import Encoder
from umr.retrieval.items import Item
from umr.retrieval.corpus.mbeir import Instructions, MbeirQuery
from umr.retrieval.rerank.reranker import fuse
from umr.training.mining import portable, retrieve


@dataclass(frozen=True)
class RerankerConfig:
    epochs: int = 4
    batch_size: int = 64  # (query, candidate) pairs per step, half positive
    lr: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 0


def train_reranker(reranker, queries: list[MbeirQuery], pool: dict[str, Item], cfg: RerankerConfig,
                   log: Callable[[dict], None] | None = None) -> list[dict]:
    usable = [q for q in queries if any(d in pool for d in q.positives) and any(d in pool for d in q.negatives)]
    if len(usable) < 2:
        raise InvalidArgument("the re-ranker trains on queries with positives and mined negatives in the pool "
                         f"({len(usable)} have both): give it `umr mine` output")
    reranker.prepare_training([q.item for q in usable], "queries")
    reranker.prepare_training([pool[d] for d in {d for q in usable for d in q.positives + q.negatives if d in pool}],
                              "candidates")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    reranker.train(True)
    params = reranker.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = max(1, cfg.batch_size // 2)
    steps = max(1, len(usable) // per_step)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.1)
    bce = torch.nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(usable))
        t0, losses, correct = time.perf_counter(), [], []
        for s in range(steps):
            batch = [usable[i] for i in order[s * per_step : (s + 1) * per_step]]
            qs, cands, labels = [], [], []
            for q in batch:
                pos = [d for d in q.positives if d in pool]
                neg = [d for d in q.negatives if d in pool]
                qs += [q.item, q.item]
                cands += [pool[pos[rng.integers(len(pos))]], pool[neg[rng.integers(len(neg))]]]
                labels += [1.0, 0.0]
            logits = reranker.logits(qs, cands)
            y = torch.tensor(labels)
            loss = bce(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            # pairwise accuracy: the positive outscored the negative drawn for the same query
            lg = logits.detach().view(-1, 2)
            correct.append(float((lg[:, 0] > lg[:, 1]).float().mean()))
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "pair_accuracy": float(np.mean(correct)),
               "pairs_per_s": steps * per_step * 2 / max(time.perf_counter() - t0, 1e-9)}
        history.append(rec)
        if log:
            log(rec)
    reranker.train(False)
    return history


def score_lists(encoder: Encoder, reranker, queries: list[MbeirQuery], pool: dict[str, Item],
                top: int = 50, weight: float = 1.0, fraction: float = 0.1, seed: int = 42, local: bool = True,
                instructions: Instructions | None = None) -> tuple[list[dict], dict]:
    """Teacher lists for a stratified `fraction` of the queries (per task, as U-MARVEL's 10%):
    the student's top `top` with cos, P(yes) and the fused teacher score, best first."""
    rng = np.random.default_rng(seed)
    by_task: dict = {}
    for q in queries:
        by_task.setdefault(q.task_id, []).append(q)
    chosen = []
    for qs in by_task.values():
        n = max(1, round(len(qs) * fraction))
        chosen += [qs[i] for i in sorted(rng.choice(len(qs), min(n, len(qs)), replace=False))]
    out, stats = [], {"queries": len(chosen), "positive in the list": 0, "teacher put a positive first": 0,
                      "student put a positive first": 0}
    from tqdm import tqdm

    ranked_all = list(retrieve(encoder, chosen, pool, top, local, instructions))
    for q, _, ranked, _ in tqdm(ranked_all, unit="query", desc="re-ranking", file=sys.stderr):
        p_yes = reranker.score(q.item, [pool[d] for d, _ in ranked])
        cos = np.array([s for _, s in ranked], dtype=np.float32)
        fused = fuse(cos, p_yes, weight)
        order = np.argsort(-fused, kind="stable")
        positives = set(q.positives)
        stats["positive in the list"] += any(d in positives for d, _ in ranked)
        stats["student put a positive first"] += ranked[0][0] in positives
        stats["teacher put a positive first"] += ranked[order[0]][0] in positives
        teacher_list = [{"did": ranked[i][0], "cos": round(float(cos[i]), 5), "p_yes": round(float(p_yes[i]), 5),
                         "teacher": round(float(fused[i]), 5)} for i in order]
        out.append({**portable(q), "teacher_list": teacher_list, "teacher": {"encoder": encoder.fingerprint,
                                                                        "reranker": reranker.path, "weight": weight}})
    return out, stats
