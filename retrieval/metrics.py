"""Ranking metrics over ranked id lists and relevance judgements (hit-rate Recall, nDCG, MRR)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def recall_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """M-BEIR Recall@k: 1 when any relevant candidate is in the top k (a hit rate)."""
    return float(any(relevant.get(d, 0) > 0 for d in ranked[:k]))


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    dcg = sum((2 ** relevant.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def summarize(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
              ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Mean metrics over the queries that have at least one relevant candidate."""
    qids = [q for q in runs if any(g > 0 for g in qrels.get(q, {}).values())]
    if not qids:
        return {"queries": 0}
    out: dict = {"queries": len(qids)}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at(runs[q], qrels[q], k) for q in qids) / len(qids)
    out["ndcg@10"] = sum(ndcg_at(runs[q], qrels[q], 10) for q in qids) / len(qids)
    out["mrr@10"] = sum(mrr_at(runs[q], qrels[q], 10) for q in qids) / len(qids)
    return out
