"""FAISS's rows against the stored vectors, and which of the two to believe where they differ.

A FAISS file whose size and checksum match its manifest record can still hold other vectors
(written by another tool, or replaced together with its record); a stored vector can be damaged
on disk while the FAISS checkpoint made before still holds it whole. Rebuilding FAISS from the
store is right in the first case and makes answers worse in the second (measured: 2-10 of 20
queries kept their answers after such a repair). umr only ever stores unit vectors, so a stored
vector that is not one is the damaged side, and so is one in a block of the vector file whose
checksum fails (index/vector_file.py): it is restored from a checkpoint that holds vectors
exactly (flat, HNSW), or reported as what --repair cannot mend (IVF-PQ holds approximations).
Stored unit vectors that FAISS disagrees with make FAISS the suspect: it is rebuilt from them.
"""
from __future__ import annotations

import faiss
import numpy as np

from umr.index.vector_file import BLOCK_ROWS

TOLERANCE = 1e-4  # largest difference per coordinate between a FAISS row and what its stored vector gives
UNIT = 1e-3  # how far from length 1 a stored vector may be (float32 rounding is 1e-7)


def rows_to_compare(seg, sample: int | None, seed: int = 0) -> np.ndarray:
    """The rows of the segment's FAISS checkpoint to compare: all, or a sorted random sample.
    Rows after a mapped checkpoint (its tail) are read from the store itself, so not here."""
    n = 0 if seg.faiss is None else int(seg.faiss.ntotal)
    if sample is None or sample >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def differing_rows(store, seg, rows: np.ndarray, suspect: np.ndarray | None = None) -> np.ndarray:
    """Rows whose FAISS entry is not what their stored vector gives. An IVF-PQ row is compared
    with the stored vector's own PQ encoding, decoded: what FAISS must hold. A `suspect` row (in
    a block failing its checksum) of an exact index must match to the bit: FAISS was given the
    vectors exactly as the file gives them back."""
    if len(rows) == 0:
        return rows
    index = seg.faiss
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    wrong: list[np.ndarray] = []
    try:
        for start in range(0, len(rows), 8192):
            chunk = rows[start:start + 8192]
            stored = np.ascontiguousarray(store.docs.vectors_at(seg.id, chunk), dtype=np.float32)
            with np.errstate(all="ignore"):
                want = stored if ivf is None else index.sa_decode(index.sa_encode(np.nan_to_num(stored)))
                got = index.reconstruct_batch(chunk.astype(np.int64))
                tolerance = np.where(np.isin(chunk, suspect), 0.0, TOLERANCE) if ivf is None and suspect is not None \
                    else TOLERANCE
                far = ~(np.abs(got - want).max(axis=1) <= tolerance)  # NaN counts as far
            wrong.append(chunk[far])
    finally:
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return np.concatenate(wrong)


def not_unit(vectors: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
    return ~(np.abs(norms - 1.0) <= UNIT)


def block_rows(blocks: list[int]) -> np.ndarray:
    """The rows of the vector file's blocks `blocks`."""
    if not blocks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS) for b in blocks])


def failing_block_problems(seg, blocks: list[int]) -> list[str]:
    return [f"segment {seg.id}: rows {b * BLOCK_ROWS}..{(b + 1) * BLOCK_ROWS - 1} of its vector file fail their checksum"
            for b in blocks[:20]] + ([f"segment {seg.id}: {len(blocks) - 20} more blocks fail theirs"] if len(blocks) > 20 else [])


def check_segment(store, seg, rows: np.ndarray, repair: bool, report, suspect: np.ndarray | None = None) -> None:
    """Compare, and report (or with `repair` mend) what differs, believing the side that can be.
    `suspect`: rows whose stored copy is known damaged where they differ (a failing checksum)."""
    n = 0 if seg.faiss is None else int(seg.faiss.ntotal)
    suspect = np.zeros(0, dtype=np.int64) if suspect is None else suspect[suspect < n]
    wrong = differing_rows(store, seg, np.union1d(rows, suspect), suspect)
    if len(wrong) == 0:
        return
    damaged = wrong[not_unit(store.docs.vectors_at(seg.id, wrong)) | np.isin(wrong, suspect)]
    suspect_faiss = np.setdiff1d(wrong, damaged)
    exact = seg.choice is not None and seg.choice.traits.holds_full_vectors
    if len(damaged):
        what = (f"segment {seg.id}: {len(damaged)} stored vectors are damaged (not of unit length, which every vector "
                f"umr stores is, or in a block failing its checksum; rows {_rows(damaged)})")
        if exact and repair:
            store.docs.put_vectors(seg.id, damaged, seg.faiss.reconstruct_batch(damaged.astype(np.int64)))
            report.repaired.append(f"{what}; restored from the FAISS checkpoint, which holds them exactly")
        elif exact:
            report.problems.append(f"{what}; --repair restores them from the FAISS checkpoint, which holds them exactly")
        else:
            report.problems.append(what)
            ids = [d.id for d in store.docs.docs_at(seg.id, damaged[:5], seg.epoch).values()]
            report.unrepairable.append(f"damaged stored vectors in segment {seg.id}, whose IVF-PQ checkpoint holds only "
                                       f"approximations of them: add those documents again ({', '.join(map(repr, ids))}"
                                       f"{', ...' if len(damaged) > 5 else ''})")
    if len(suspect_faiss):
        what = (f"segment {seg.id}: {len(suspect_faiss)} of {len(rows)} rows compared differ between FAISS and the "
                f"stored vectors (rows {_rows(suspect_faiss)})")
        if repair and (exact or not len(damaged)):
            store.rebuild(seg, what)
        else:
            report.problems.append(f"{what}; --repair rebuilds FAISS from the document store")


def _rows(rows: np.ndarray) -> str:
    return ", ".join(map(str, rows[:5].tolist())) + (", ..." if len(rows) > 5 else "")
