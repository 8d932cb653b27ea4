"""Ranking metrics over ranked id lists and relevance judgements, as the field defines them.

- `hit_rate@k`: 1 when any relevant candidate is in the top k. M-BEIR and the CLIP retrieval
  papers call this Recall@k; umr reports it under its own name.
- `recall@k`: the fraction of a query's relevant candidates in the top k (trec_eval's recall_k,
  BEIR's Recall@k). The two agree when every query has exactly one relevant candidate.
- `ndcg@k`: gain = the relevance value itself, discount log2(rank + 1), as trec_eval's
  ndcg_cut and BEIR (through pytrec_eval) compute it; on graded judgements (Cranfield's 1-4) this
  differs from the 2^rel - 1 gain of some learning-to-rank code.
- `mrr@k`: reciprocal rank of the first relevant candidate within the top k.
Judgements of 0 or less count as not relevant. Checked against pytrec_eval in the tests.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def hit_rate_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    return float(any(relevant.get(d, 0) > 0 for d in ranked[:k]))


def recall_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    total = sum(1 for g in relevant.values() if g > 0)
    if total == 0:
        return 0.0
    return sum(1 for d in set(ranked[:k]) if relevant.get(d, 0) > 0) / total


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    dcg = sum(max(relevant.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def judged(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The queries that count: those with at least one relevant candidate."""
    return [q for q in runs if any(g > 0 for g in qrels.get(q, {}).values())]


def curve(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]], metric: str = "hit_rate",
          ks: Sequence[int] = tuple(range(1, 101))) -> list[float]:
    """Mean `hit_rate` or `recall` at each k (for the Recall@k curves of `umr eval --plot`)."""
    fn = {"hit_rate": hit_rate_at, "recall": recall_at}[metric]
    qids = judged(runs, qrels)
    return [sum(fn(runs[q], qrels[q], k) for q in qids) / len(qids) if qids else 0.0 for k in ks]


def summarize(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
              ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Mean metrics over the judged queries."""
    qids = judged(runs, qrels)
    if not qids:
        return {"queries": 0}
    out: dict = {"queries": len(qids)}
    for k in ks:
        out[f"hit_rate@{k}"] = sum(hit_rate_at(runs[q], qrels[q], k) for q in qids) / len(qids)
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at(runs[q], qrels[q], k) for q in qids) / len(qids)
    out["ndcg@10"] = sum(ndcg_at(runs[q], qrels[q], 10) for q in qids) / len(qids)
    out["mrr@10"] = sum(mrr_at(runs[q], qrels[q], 10) for q in qids) / len(qids)
    return out
