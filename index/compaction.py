"""Dead rows (replaced and deleted documents) and their tombstones dropped, segment by segment.

For each segment, the FAISS index of its live rows is written first, under a new name; then
one document-store transaction renumbers the rows, bumps the segment's epoch and records that
checkpoint; then (the caller's save) the manifest names it. Killed before the transaction,
nothing changed; after it, the next open takes the checkpoint the transaction recorded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from umr.index import integrity
from umr.index.docstore import DocStore
from umr.index.segment import Segment
from umr.index.segment_loading import index_of_rows


def compact_segments(index_dir: Path, docs: DocStore, segments: list[Segment]) -> tuple[dict[int, int], list[str]]:
    """(rows dropped per segment, checkpoint files no longer named once the manifest is saved)."""
    dropped, replaced = {}, []
    for seg in segments:
        if seg.alive.all():
            continue
        live = np.flatnonzero(seg.alive)
        pending = index = None
        if seg.faiss is not None:
            index = index_of_rows(seg, docs, live)
            name, record = integrity.write_checkpoint(index_dir, seg.id, index, len(live), docs.epoch(seg.id) + 1)
            pending = {"faiss_file": name, **record}
        dropped[seg.id] = docs.compact(seg.id, pending)
        seg.epoch = docs.epoch(seg.id)
        seg.alive, seg.codes = docs.row_state(seg.id, docs.row_count(seg.id))
        if pending is not None:
            replaced.append(seg.record.get("faiss_file"))
            seg.set_index(index)
            integrity.adopt_pending(seg.record, pending)
            seg.dirty = False
    return dropped, replaced
