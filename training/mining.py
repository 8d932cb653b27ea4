"""Hard-negative mining (U-MARVEL stage 2): each training query's top candidates under the
current encoder, labelled positives removed, written back as M-BEIR query lines whose
`neg_cand_list` a training stage reads.

What U-MARVEL lacks and umr adds: a false-negative guard. An unlabelled candidate that scores
almost as high as the positive is more often a missing label than a negative (Flickr: another
photo of a dog on a beach), and training against it teaches the wrong thing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from index.vector_index import exact_topk
from retrieval.encoders import Encoder
from retrieval.items import Item
from retrieval.mbeir import Instructions, MbeirQuery


@dataclass(frozen=True)
class MiningConfig:
    top: int = 100  # candidates retrieved per query before filtering
    keep: int | None = 5  # negatives kept per query (None: all that pass)
    window: tuple[int, int] | None = None  # 1-based ranks [first, last] among the negatives that pass
    guard: float | None = 0.95  # drop candidates scoring above guard * the best positive's score
    local: bool = True  # restrict each task to its positives' modality (M-BEIR local pool)
    seed: int = 0


def _target_modality(queries: list[MbeirQuery], modality_of: dict[str, str]) -> str | None:
    counts = Counter(modality_of[d] for q in queries for d in q.positives if d in modality_of)
    return counts.most_common(1)[0][0] if counts else None


def mine(encoder: Encoder, queries: list[MbeirQuery], pool: dict[str, Item], cfg: MiningConfig,
         instructions: Instructions | None = None, batch_size: int = 64) -> tuple[list[dict], dict]:
    """(M-BEIR query records with neg_cand_list and the scores, statistics)."""
    dids = list(pool)
    items = [pool[d] for d in dids]
    cvec = encoder.encode(items, role="document", batch_size=batch_size)
    modality_of = {d: it.modality for d, it in zip(dids, items)}
    cmod = np.array([modality_of[d] for d in dids])
    by_task: dict = {}
    for q in queries:
        by_task.setdefault(q.task_id, []).append(q)
    rng = np.random.default_rng(cfg.seed)
    out, stats = [], Counter()
    for task, qs in by_task.items():
        target = _target_modality(qs, modality_of) if cfg.local else None
        cols = np.flatnonzero(cmod == target) if target else np.arange(len(dids))
        qvec = encode_queries(encoder, qs, lambda q: _instruction(q, target, instructions), batch_size)
        top = min(cfg.top, len(cols))
        scores, idx = exact_topk(qvec, cvec[cols], top)
        col_of = {dids[c]: j for j, c in enumerate(cols)}
        for q, qv, sc, ix in zip(qs, qvec, scores, idx):
            positives = set(q.positives)
            pos_cols = [col_of[d] for d in q.positives if d in col_of]
            pos_score = float(max(cvec[cols[pos_cols]] @ qv)) if pos_cols else None
            negs = []
            for s, j in zip(sc, ix):
                did = dids[cols[j]]
                if did in positives:
                    continue
                if cfg.guard is not None and pos_score is not None and s > cfg.guard * pos_score:
                    stats["dropped by the false-negative guard"] += 1
                    continue
                negs.append((did, float(s)))
            if cfg.window:
                negs = negs[cfg.window[0] - 1 : cfg.window[1]]
                if cfg.keep is not None and len(negs) > cfg.keep:
                    pick = np.sort(rng.choice(len(negs), cfg.keep, replace=False))
                    negs = [negs[i] for i in pick]
            elif cfg.keep is not None:
                negs = negs[: cfg.keep]
            if not pos_cols:
                stats["queries whose positives are not in the pool"] += 1
            stats["queries"] += 1
            stats["negatives"] += len(negs)
            if not negs:
                stats["queries left without negatives"] += 1
            rank = next((r for r, j in enumerate(ix, 1) if dids[cols[j]] in positives), None)
            stats["positive ranked first"] += rank == 1
            out.append({**q.record, "neg_cand_list": [d for d, _ in negs], "neg_scores": [round(s, 5) for _, s in negs],
                        "pos_score": None if pos_score is None else round(pos_score, 5),
                        "mined_by": encoder.fingerprint})
    return out, dict(stats)


def encode_queries(encoder: Encoder, queries: list[MbeirQuery], instruction_of, batch_size: int = 64) -> np.ndarray:
    """Queries grouped by their instruction, so each group encodes in full batches."""
    groups: dict = {}
    for i, q in enumerate(queries):
        groups.setdefault(instruction_of(q), []).append(i)
    out = np.zeros((len(queries), encoder.dim), dtype=np.float32)
    for instruction, rows in groups.items():
        out[rows] = encoder.encode([queries[i].item for i in rows], role="query", instruction=instruction,
                                   batch_size=batch_size)
    return out


def _instruction(q: MbeirQuery, target: str | None, instructions: Instructions | None) -> str | None:
    if instructions is None or target is None:
        return None
    return instructions.pick(q.dataset_id, q.item.modality, target)
