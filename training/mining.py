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

from umr.index.vector_index import exact_topk
from umr.retrieval.encoders import Encoder
from umr.retrieval.items import Item
from umr.retrieval.corpus.mbeir import Instructions, MbeirQuery, target_modality
from umr.retrieval.progress import encode_with_bar, in_slices


@dataclass(frozen=True)
class MiningConfig:
    top: int = 100  # candidates retrieved per query before filtering
    keep: int | None = 5  # negatives kept per query (None: all that pass)
    window: tuple[int, int] | None = None  # 1-based ranks [first, last] among the negatives that pass
    guard: float | None = 0.95  # drop candidates scoring above guard * the best positive's score
    local: bool = True  # restrict each task to its positives' modality (M-BEIR local pool)
    seed: int = 0


def retrieve(encoder: Encoder, queries: list[MbeirQuery], pool: dict[str, Item], top: int, local: bool = True,
             instructions: Instructions | None = None, batch_size: int = 64, progress: bool = False):
    """Yields (query, query vector, [(did, cosine)] best first, {did: cosine} of its positives)
    over each task's local pool (its positives' modality) or the whole pool. With `progress`,
    bars on stderr for the pool, the queries and the search."""
    dids = list(pool)
    items = [pool[d] for d in dids]
    cvec = encode_with_bar(encoder, items, "embedding the pool", progress, batch_size, role="document")
    modality_of = {d: it.modality for d, it in zip(dids, items)}
    cmod = np.array([modality_of[d] for d in dids])
    by_task: dict = {}
    for q in queries:
        by_task.setdefault(q.task_id, []).append(q)
    for task, qs in by_task.items():
        target = target_modality((d for q in qs for d in q.positives), modality_of) if local else None
        cols = np.flatnonzero(cmod == target) if target else np.arange(len(dids))
        qvec = encode_queries(encoder, qs, lambda q: _instruction(q, target, instructions), batch_size,
                              f"embedding task {task} queries" if progress else None)
        pool_vecs, k = cvec[cols], min(top, len(cols))
        scores, idx = in_slices(lambda part: exact_topk(part, pool_vecs, k), qvec, 256, f"searching task {task}",
                                progress, unit="query")
        col_of = {dids[c]: c for c in cols}
        for q, qv, sc, ix in zip(qs, qvec, scores, idx):
            pos = {d: float(cvec[col_of[d]] @ qv) for d in q.positives if d in col_of}
            yield q, qv, [(dids[cols[j]], float(s)) for s, j in zip(sc, ix)], pos


def mine(encoder: Encoder, queries: list[MbeirQuery], pool: dict[str, Item], cfg: MiningConfig,
         instructions: Instructions | None = None, batch_size: int = 64, progress: bool = False) -> tuple[list[dict], dict]:
    """(M-BEIR query records with neg_cand_list and the scores, statistics); `progress`: bars
    on stderr while the pool and the queries are embedded and searched."""
    rng = np.random.default_rng(cfg.seed)
    out, stats = [], Counter()
    for q, _, ranked, pos in retrieve(encoder, queries, pool, cfg.top, cfg.local, instructions, batch_size, progress):
        positives = set(q.positives)
        pos_score = max(pos.values()) if pos else None
        negs = []
        for did, s in ranked:
            if did in positives:
                continue
            if cfg.guard is not None and pos_score is not None and s > cfg.guard * pos_score:
                stats["dropped by the false-negative guard"] += 1
                continue
            negs.append((did, s))
        if cfg.window:
            negs = negs[cfg.window[0] - 1 : cfg.window[1]]
            if cfg.keep is not None and len(negs) > cfg.keep:
                pick = np.sort(rng.choice(len(negs), cfg.keep, replace=False))
                negs = [negs[i] for i in pick]
        elif cfg.keep is not None:
            negs = negs[: cfg.keep]
        if not pos:
            stats["queries whose positives are not in the pool"] += 1
        stats["queries"] += 1
        stats["negatives"] += len(negs)
        if not negs:
            stats["queries left without negatives"] += 1
        stats["positive ranked first"] += bool(ranked) and ranked[0][0] in positives
        out.append({**portable(q), "neg_cand_list": [d for d, _ in negs], "neg_scores": [round(s, 5) for _, s in negs],
                    "pos_score": None if pos_score is None else round(pos_score, 5), "mined_by": encoder.fingerprint})
    return out, dict(stats)


def portable(q: MbeirQuery) -> dict:
    """The query's line with its image path made absolute: the output file may live anywhere,
    and M-BEIR paths are relative to the data set's folder."""
    rec = dict(q.record)
    if rec.get("query_img_path") and isinstance(q.item.image, str):
        rec["query_img_path"] = q.item.image
    return rec


def encode_queries(encoder: Encoder, queries: list[MbeirQuery], instruction_of, batch_size: int = 64,
                   desc: str | None = None) -> np.ndarray:
    """Queries grouped by their instruction, so each group encodes in full batches; a bar
    named `desc` when given."""
    groups: dict = {}
    for i, q in enumerate(queries):
        groups.setdefault(instruction_of(q), []).append(i)
    out = np.zeros((len(queries), encoder.dim), dtype=np.float32)
    for instruction, rows in groups.items():
        out[rows] = encode_with_bar(encoder, [queries[i].item for i in rows], desc or "", desc is not None, batch_size,
                                    role="query", instruction=instruction)
    return out


def _instruction(q: MbeirQuery, target: str | None, instructions: Instructions | None) -> str | None:
    if instructions is None or target is None:
        return None
    return instructions.pick(q.dataset_id, q.item.modality, target)
