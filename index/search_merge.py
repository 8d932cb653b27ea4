"""A search plan (index/search_plan.py) run over the store's segments: each segment searched by
the kernel (index/segment_search.py), the candidates merged by score per query, the winners'
documents read in one call per segment.

Segments that scan many rows (exact and IVF; encoder versions, shards) are searched side by
side on a shared pool while the calling thread searches the rest: FAISS and torch release the
GIL. An HNSW walk takes well under a millisecond, less than handing it to a thread costs
(bench/segments.py)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from umr.index import version_scale
from umr.index.calibration_cache import CalibrationCache
from umr.index.documents import DocRecord
from umr.index.docstore import DocStore
from umr.index.search_plan import SearchHit, SearchPlan
from umr.index.segment import Segment
from umr.index.segment_search import search_segment

# Threads that search the segments of one query batch side by side (1: one after the other),
# and the size from which an exact or IVF segment is worth a thread of its own.
SEGMENT_THREADS = max(1, min(8, os.cpu_count() or 1))
PARALLEL_MIN_ROWS = 20_000
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()

# One candidate: (score merged by, segment id, row, raw cosine where the score is not one).
Candidate = tuple[float, int, int, float | None]


def _segment_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=SEGMENT_THREADS, thread_name_prefix="umr-segment")
        return _POOL


def run_plan(plan: SearchPlan, segments: list[Segment], docs: DocStore,
             calibrations: CalibrationCache) -> list[list[SearchHit]]:
    """The plan's hits per query. The caller holds the store lock: calibrations fitted here
    take it again (it is re-entrant) and segment threads only read."""
    searched = [seg for seg in segments if seg.indexed_rows and seg.alive.any()]
    groups = calibrations.groups(searched, plan.query_modalities if plan.calibrated else None, plan.modalities)
    fitted = {seg.id: calibrations.of(seg) for seg in searched} if groups else {}
    qmods = np.array(plan.query_modalities if plan.query_modalities else [None] * plan.n_queries)
    plain = np.flatnonzero(~np.isin(qmods, list(groups)))

    def hits_of(seg: Segment) -> list[tuple[int, list[Candidate]]]:
        q = plan.queries_for(seg)
        found = _plain_hits(plan, seg, docs, q, plain) if len(plain) else []
        for qm, wanted in groups.items():
            found += _calibrated_hits(plan, seg, docs, q, np.flatnonzero(qmods == qm), qm,
                                      dict(wanted)[seg], fitted[seg.id])
        return found

    per_query: list[list[Candidate]] = [[] for _ in range(plan.n_queries)]
    for found in _each_segment(searched, hits_of):
        for qi, candidates in found:
            per_query[qi].extend(candidates)
    epochs = {seg.id: seg.epoch for seg in searched}
    return [_top_hits(candidates, plan.k, docs, epochs) for candidates in per_query]


def _each_segment(searched: list[Segment], hits_of) -> list:
    """hits_of(segment) for each, the heavy ones on the pool, in the segments' order."""
    heavy = [i for i, seg in enumerate(searched)
             if seg.choice.traits.worth_a_thread and seg.indexed_rows >= PARALLEL_MIN_ROWS]
    pool = _segment_pool() if SEGMENT_THREADS > 1 and len(searched) > 1 else None
    futures = {i: pool.submit(hits_of, searched[i]) for i in heavy} if pool else {}
    here = {i: hits_of(seg) for i, seg in enumerate(searched) if i not in futures}
    return [futures[i].result() if i in futures else here[i] for i in range(len(searched))]


def _plain_hits(plan: SearchPlan, seg: Segment, docs: DocStore, q: np.ndarray,
                which: np.ndarray) -> list[tuple[int, list[Candidate]]]:
    """Queries merged by raw cosine, or, over several encoder versions, by the mapped score."""
    raw, rows = search_segment(seg, docs, q[which], plan.k, plan.modalities, plan.flt)
    if plan.score_maps:  # segments of several versions: all on the active scale, bent alike
        scale, offset = plan.score_map(seg)
        scores = version_scale.apply(raw, scale[which], offset[which])
        return [(qi, [(float(s), seg.id, int(r), float(c)) for s, c, r in zip(scores[j], raw[j], rows[j]) if r >= 0])
                for j, qi in enumerate(which)]
    return [(qi, [(float(s), seg.id, int(r), None) for s, r in zip(raw[j], rows[j]) if r >= 0])
            for j, qi in enumerate(which)]


def _calibrated_hits(plan: SearchPlan, seg: Segment, docs: DocStore, q: np.ndarray, which: np.ndarray,
                     query_modality: str, doc_modalities: list[str], cal) -> list[tuple[int, list[Candidate]]]:
    """Queries of one modality searched per document modality, each scored by its calibration."""
    found = []
    for dm in doc_modalities:
        raw, rows = search_segment(seg, docs, q[which], plan.k, [dm], plan.flt)
        scores = cal.apply(raw, query_modality, dm)
        found += [(qi, [(float(s), seg.id, int(r), float(c)) for s, c, r in zip(scores[j], raw[j], rows[j]) if r >= 0])
                  for j, qi in enumerate(which)]
    return found


def _top_hits(candidates: list[Candidate], k: int, docs: DocStore, epochs: dict[int, int]) -> list[SearchHit]:
    """The best k candidates with their documents (a row deleted meanwhile drops out), read in
    the numbering each segment's rows were read in (`epochs`)."""
    candidates.sort(key=lambda h: -h[0])
    best = candidates[:k]
    docs_by_seg: dict[int, dict[int, DocRecord]] = {
        seg_id: docs.docs_at(seg_id, [h[2] for h in best if h[1] == seg_id], epochs[seg_id])
        for seg_id in {h[1] for h in best}}
    out = []
    for score, seg_id, row, cosine in best:
        doc = docs_by_seg[seg_id].get(row)
        if doc is not None:
            out.append(SearchHit(doc.id, score, doc, seg_id, cosine=cosine))
    return out
