"""One segment's top-k: the search kernel under the store's merge (index/search_merge.py).

Picks, per call, the cheapest exact-enough path: a scan of a flat segment (on the device where
one mirrors it), an exact scan of the few rows a filter leaves, or the ANN index with an ID
selector, re-scored with the exact vectors where the index keeps compressed codes, plus the
exact scan of a memory-mapped segment's tail."""
from __future__ import annotations

import numpy as np

from umr.index import gpu
from umr.index import vector_index as vi
from umr.index.documents import MODALITY_CODES
from umr.index.docstore import DocStore
from umr.index.segment import Segment

# With this few candidates left after filtering, scoring them exactly beats a filtered ANN walk.
EXACT_FILTER_ROWS = 4096


def empty_result(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def allowed_rows(seg: Segment, docs: DocStore, modalities: list[str] | None, flt: dict | None) -> np.ndarray:
    """Live rows of the segment that match the modalities and the filter, as a mask."""
    allowed = seg.alive.copy()
    if modalities:
        codes = [MODALITY_CODES[m] for m in modalities]
        allowed &= np.isin(seg.codes, codes)
    if flt:
        match = np.zeros_like(allowed)
        rows = docs.rows_matching(seg.id, flt, seg.epoch)
        match[rows[rows < len(match)]] = True
        allowed &= match
    return allowed


def search_segment(seg: Segment, docs: DocStore, q: np.ndarray, k: int, modalities: list[str] | None = None,
                   flt: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (n, k): -inf and -1 past the segment's allowed rows."""
    if seg.indexed_rows == 0:
        return empty_result(len(q), k)
    choice = seg.choice
    if not modalities and not flt and seg.alive.all():  # the common case: no mask to build
        allowed, n_allowed, everything = None, len(seg.alive), True
    else:
        allowed = allowed_rows(seg, docs, modalities, flt)
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            return empty_result(len(q), k)
        everything = n_allowed == len(allowed)
    if choice.traits.scanned and seg.gpu is not None:  # a DeviceFlat takes masks
        return seg.gpu.search(q, k, None if everything else allowed)
    if choice.traits.scanned:
        return vi.exact_topk(q, vi.flat_vectors(seg.faiss), k, None if everything else allowed)
    if not everything and n_allowed <= EXACT_FILTER_ROWS:
        rows = np.flatnonzero(allowed)
        scores, pos = vi.exact_topk(q, docs.vectors_at(seg.id, rows), k)
        return scores, np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
    selector, _bits = (None, None) if everything else vi.bitmap_selector(allowed)
    refine = int(choice.params.get("refine", 1)) if choice.traits.refines else 0
    kk = min(k * max(1, refine), n_allowed)
    if seg.gpu is not None and everything and k * 10 <= gpu.MAX_K:  # GPU FAISS takes no ID selector
        scores, rows = seg.gpu.search(q, kk)
    else:
        scores, rows = seg.faiss.search(q, kk, params=vi.search_params(choice, selector, kk))
    if refine:  # IVF-PQ: the top k*refine re-scored exactly, so scores are cosines (refine 1: the top k)
        scores, rows = refine_exactly(seg, docs, q, rows, k)
    if len(seg.tail):
        scores, rows = with_tail(seg, q, k, scores, rows, allowed)
    return scores, rows


def with_tail(seg: Segment, q: np.ndarray, k: int, scores: np.ndarray, rows: np.ndarray,
              allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Merge the exact top-k of the rows after a mapped checkpoint into the index's top-k."""
    first = int(seg.faiss.ntotal)
    mask = None if allowed is None else allowed[first:first + len(seg.tail)]
    t_scores, t_pos = vi.exact_topk(q, seg.tail, k, mask)
    t_rows = np.where(t_pos >= 0, t_pos + first, -1)
    all_s = np.concatenate([scores[:, :k], t_scores], axis=1)
    all_r = np.concatenate([rows[:, :k], t_rows], axis=1)
    all_s = np.where(all_r >= 0, all_s, -np.inf)
    order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_s, order, 1), np.take_along_axis(all_r, order, 1)


def refine_exactly(seg: Segment, docs: DocStore, q: np.ndarray, rows: np.ndarray, k: int):
    """Re-score compressed-code candidates with the segment's exact vectors."""
    wanted = np.unique(rows[rows >= 0])
    if len(wanted) == 0:
        return empty_result(len(q), k)
    vecs = docs.vectors_at(seg.id, wanted)
    pos = {int(r): i for i, r in enumerate(wanted)}
    out_s, out_r = empty_result(len(q), k)
    for qi in range(len(q)):
        cand = rows[qi][rows[qi] >= 0]
        exact = vecs[[pos[int(r)] for r in cand]] @ q[qi]
        top = np.argsort(-exact, kind="stable")[:k]
        out_s[qi, : len(top)] = exact[top]
        out_r[qi, : len(top)] = cand[top]
    return out_s, out_r
