"""A segment opened from its checkpoint and the document store, and a segment's FAISS index
built from the document store: the document store is the truth, a checkpoint a cache of it.

Rows committed after the checkpoint are replayed; a damaged or missing checkpoint is rebuilt
(and reported through `on_repair`); vectors missing from the vector file are refused unless a
FAISS checkpoint holds them exactly and the caller repairs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from umr.index import gpu, integrity, vector_file
from umr.index import vector_index as vi
from umr.index.docstore import DocStore
from umr.index.errors import IndexError_
from umr.index.segment import Segment

log = logging.getLogger("umr.index")


def load_segment(path: Path, docs: DocStore, rec: dict, read_only: bool, repair: bool,
                 on_repair: Callable[[str], None]) -> Segment:
    """The segment, its `epoch` the document store's numbering its rows were read in."""
    epoch = docs.epoch(rec["id"])
    n_rows = docs.row_count(rec["id"])
    alive, codes = docs.row_state(rec["id"], n_rows)
    seg = Segment(rec, None, alive, codes)
    seg.epoch = epoch
    on_disk = docs.vectors.missing(seg.id, n_rows)
    if rec.get("index") is None:
        if on_disk is not None:
            raise IndexError_(_missing_vectors_message(path, docs, seg, on_disk, n_rows))
        return seg  # still building: vectors are only in the docstore
    integrity.adopt_recorded_compaction(rec, docs.pending_checkpoint(seg.id), epoch)
    faiss_file = path / rec["faiss_file"] if rec.get("faiss_file") else None
    # A reader leaves IVF-PQ lists in the file: the index that outgrew memory still serves.
    mapped = read_only and vi.IndexChoice.from_dict(rec["index"]).traits.maps_lists
    loaded, problem = integrity.load_checkpoint(faiss_file, rec, seg.dim, n_rows, epoch, mapped)
    if problem == integrity.DOCSTORE_OLDER and not repair:
        raise IndexError_(integrity.older_docstore_message(path, seg.id, n_rows, rec))
    if on_disk is not None:
        _restore_vectors(path, docs, seg, loaded, on_disk, n_rows, repair, on_repair)
    if loaded is None:
        if problem:
            where = (" in memory only, the file left as it is (opened read-only; `umr index verify --repair` "
                     "rewrites it)") if read_only else ""
            on_repair(f"segment {seg.id}: {problem}; rebuilt its FAISS index from the document store "
                      f"({n_rows} rows){where}")
        rebuild(seg, docs)
    else:
        seg.set_index(loaded)
    if seg.indexed_rows < n_rows:  # replay rows committed after the last checkpoint
        log.info("segment %d: replaying %d rows committed after its last checkpoint", seg.id,
                 n_rows - seg.indexed_rows, extra={"segment": seg.id})
        for _, vecs in docs.iter_vectors(seg.id, start=seg.indexed_rows):
            seg.append(vecs)
        seg.dirty = True
    return seg


def rebuild(seg: Segment, docs: DocStore) -> None:
    """The segment's FAISS index built anew from every row in the store, to be checkpointed."""
    seg.set_index(index_of_rows(seg, docs))
    seg.dirty = True


def index_of_rows(seg: Segment, docs: DocStore, rows: np.ndarray | None = None):
    """A FAISS index of the segment's rows `rows` (all of them: None), in that order,
    trained (IVF/PQ) on an equal share of each modality among them."""
    choice = seg.choice
    index = vi.new_index(choice, seg.dim)
    codes = seg.codes if rows is None else seg.codes[rows]
    if vi.needs_training(index):
        gpu.train_on_gpu(index)
        sample = vi.balanced_sample(codes, size=max(50_000, 64 * choice.params.get("nlist", 1)))
        index.train(docs.vectors_at(seg.id, sample if rows is None else rows[sample]))
    if rows is None:
        for _, vecs in docs.iter_vectors(seg.id):
            index.add(vecs)
    else:
        for start in range(0, len(rows), 8192):
            index.add(docs.vectors_at(seg.id, rows[start:start + 8192]))
    return index


def _restore_vectors(path: Path, docs: DocStore, seg: Segment, loaded, on_disk: int, n_rows: int, repair: bool,
                     on_repair: Callable[[str], None]) -> None:
    """Rows missing from the segment's vector file, written back from a FAISS checkpoint that
    holds them exactly (with `repair`); otherwise refused, never served without them."""
    exact = loaded is not None and seg.choice.traits.holds_full_vectors and int(loaded.ntotal) >= n_rows
    if not (repair and exact):
        raise IndexError_(_missing_vectors_message(path, docs, seg, on_disk, n_rows, exact))
    rows = np.arange(on_disk, n_rows)
    for start in range(0, len(rows), 65536):
        part = rows[start:start + 65536]
        docs.put_vectors(seg.id, part, loaded.reconstruct_batch(part))
    on_repair(f"segment {seg.id}: its vector file held {on_disk} of {n_rows} rows; restored the other "
              f"{n_rows - on_disk} from the FAISS checkpoint, which holds them exactly")


def _missing_vectors_message(path: Path, docs: DocStore, seg: Segment, on_disk: int, n_rows: int,
                             exact: bool = False) -> str:
    where = path / vector_file.file_name(seg.id, docs.epoch(seg.id), docs.vectors.dtype)
    fix = ("`umr index verify --repair` restores them from the segment's FAISS checkpoint, which holds them exactly"
           if exact else "restore the index from a backup, or delete those documents and add them again "
           "(no FAISS checkpoint of this segment holds them exactly)")
    return f"{where} holds {on_disk} of the {n_rows} vectors the document store committed (truncated or removed): {fix}"
