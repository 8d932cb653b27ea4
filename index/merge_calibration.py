"""Scores that compare across segments embedded by different encoder versions.

After an update, an old segment is searched through a compensator in its own space and a new
one in the new encoder's; their cosines are on different scales, and the new encoder, trained
on a new domain, scores that domain's documents high for every query: raw cosines let a
catalogue's photos push the old photos out of their own captions' top 5 (docs/benchmarks.md,
section continual). Merged search puts every segment's scores on one scale: the share of a
shared population of reference queries (umr's generic queries for text, the index's own
images for images) whose `RANK`-th best score in that segment is lower. A segment whose
documents come close to every query, or which is simply larger, has a higher rank-5 level and
its hits count for less; one that holds what a query is about keeps hits above that level.
The rank of the decision (top 5) is the rank the tables are fitted at: ranks 1 and 3 left
more intrusions, 10 and 20 start hiding a new segment's real matches (bench/continual.py).
While a segment holds fewer than `RANK` documents (a new version's first adds), every
segment of the search is compared at the rank it can fill: tables are kept for ranks 1 to
`RANK`. Monotone per segment, so the order within a segment never changes. Fitted per
segment, kept in the manifest, refitted when the segment grows or shrinks by half.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from index import modality_calibration as mc

RANK = 5
ALL = "*"  # the table over every document modality of the segment
RECORD_KEY = "merge_calibration"


def doc_key(modalities: list[str] | None, present: list[str]) -> str:
    """Which table a search uses: its one document modality, else the segment's only one, else all."""
    if modalities and len(modalities) == 1:
        return modalities[0]
    return present[0] if len(present) == 1 else ALL


def table_key(doc_key: str, rank: int) -> str:
    return f"{doc_key}@{rank}"


def rank_scores(scores: np.ndarray, rank: int) -> np.ndarray:
    """Each row's `rank`-th best score, or its last one where the segment holds fewer documents."""
    finite = np.isfinite(scores[:, :rank])
    last = np.maximum(finite.sum(axis=1) - 1, 0)
    return scores[np.arange(len(scores)), last]


def fit(segment_topk: Callable[[np.ndarray, list[str] | None], np.ndarray], references: Mapping[str, np.ndarray],
        present: list[str], fitted_on: int) -> mc.ModalityCalibration:
    """Tables per (reference query modality, document modality or ALL, rank 1..RANK), from the
    top-RANK scores `segment_topk(queries, modalities)` returns for the references in the
    segment's space."""
    per_pair = {}
    for qm, q in references.items():
        for key in [*present, ALL]:
            top = segment_topk(q, None if key == ALL else [key])
            for rank in range(1, RANK + 1):
                per_pair[(qm, table_key(key, rank))] = rank_scores(top, rank)
    return mc.fit_pairs(per_pair, fitted_on)


def merge_rows(merge: Mapping[int, mc.ModalityCalibration], segments: list, query_modalities: np.ndarray,
               modalities: list[str] | None, present: Callable) -> dict[int, dict[tuple[str, str], np.ndarray]]:
    """Per segment, (query modality, table key) -> the queries merged by calibration: those
    whose modality every searched segment has a table for. The others keep raw scores, so
    one answer never mixes the two scales."""
    rank = min([RANK, *(int(seg.alive.sum()) for seg in segments)])
    keys = {seg.id: table_key(doc_key(modalities, present(seg)), rank) for seg in segments}
    out: dict[int, dict] = {seg.id: {} for seg in segments}
    for qm in {m for m in query_modalities.tolist() if m is not None}:
        if all(seg.id in merge and merge[seg.id].covers(qm, [keys[seg.id]]) for seg in segments):
            rows = np.flatnonzero(query_modalities == qm)
            for seg in segments:
                out[seg.id][(qm, keys[seg.id])] = rows
    return out
