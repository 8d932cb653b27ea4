"""What a search asks of the store, and what it gets back: the edge between the engine
(retrieval/engine.py), which decides how queries map onto each segment's space and scale, and
the store, which runs the plan over its segments (index/search_merge.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from umr.index.documents import DocRecord, MODALITY_CODES, validate_filter
from umr.index.errors import IndexMismatch, InvalidArgument
from umr.index.segment import Segment


@dataclass
class SearchHit:
    id: str
    score: float
    doc: DocRecord
    segment: int
    details: dict | None = None  # e.g. a re-ranker's cosine and P(yes) behind `score`
    cosine: float | None = None  # set when `score` is calibrated (across modalities or encoder versions): the raw cosine


@dataclass
class SearchPlan:
    """Top-`k` per query, merged over segments by score.

    `queries` is one (n, dim) array for every segment, or a mapping segment id -> array when
    queries were mapped into each segment's space (older encoder versions).

    `modalities` and `flt` restrict the documents searched (a filter as in index/documents.py).

    `score_maps` gives, per segment of an older encoder version, each query's (scale, offset)
    onto the active encoder's cosines (index/version_scale.py); with it every segment's scores
    are bent into (-1, 1) alike and hits keep their raw `cosine`.

    With `query_modalities` (one per query) and `calibrated`, queries over documents of several
    modalities are searched per document modality and merged by calibrated score
    (`SearchHit.cosine` keeps the raw one); without them every score is a raw cosine.
    """

    queries: np.ndarray | Mapping[int, np.ndarray]
    k: int
    modalities: list[str] | None = None
    flt: dict | None = None
    score_maps: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None
    query_modalities: list[str] | None = None
    calibrated: bool = True

    def check(self) -> None:
        """Refuse what no segment could answer, before any is searched."""
        if self.k < 1:
            raise InvalidArgument("k must be at least 1")
        for m in self.modalities or []:
            if m not in MODALITY_CODES:
                raise InvalidArgument(f"unknown modality {m!r}: use image, text or image,text")
        if self.query_modalities is not None and len(self.query_modalities) != self.n_queries:
            raise InvalidArgument(f"{len(self.query_modalities)} query modalities for {self.n_queries} queries")
        validate_filter(self.flt)

    @property
    def n_queries(self) -> int:
        q = self.queries
        return len(next(iter(q.values()))) if isinstance(q, Mapping) else len(q)

    def queries_for(self, seg: Segment) -> np.ndarray:
        """The query vectors in the segment's space, checked against its dimension."""
        if isinstance(self.queries, Mapping) and seg.id not in self.queries:
            raise IndexMismatch(f"no query vectors for segment {seg.id}")
        q = self.queries[seg.id] if isinstance(self.queries, Mapping) else self.queries
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != seg.dim:
            raise IndexMismatch(f"query vectors have shape {q.shape}, segment {seg.id} expects (n, {seg.dim})")
        return q

    def score_map(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        """Each query's (scale, offset) for the segment: the identity for the active version's."""
        n = self.n_queries
        return self.score_maps.get(seg.id, (np.ones(n), np.zeros(n)))
