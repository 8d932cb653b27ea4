"""A segment: one FAISS index over the rows one encoder version embedded, with its row states.

Kept apart from the store (index/store.py), which decides when segments are loaded, grown
and checkpointed; a segment only knows its own rows."""
from __future__ import annotations

import numpy as np

from umr.index import gpu, layout
from umr.index import vector_index as vi
from umr.index.manifest import now


class Segment:
    """One FAISS index over rows embedded by one encoder version.

    A reader maps an IVF-PQ checkpoint's lists from the file (read-only), so rows committed
    after that checkpoint cannot join them; they are kept as `tail`, exact vectors searched by
    a scan beside the index, rows faiss.ntotal.. in order."""

    def __init__(self, record: dict, faiss_index=None, alive=None, codes=None):
        self.record = record
        self.faiss = None
        self.alive = alive if alive is not None else np.zeros(0, dtype=bool)
        self.codes = codes if codes is not None else np.zeros(0, dtype=np.uint8)
        self.dirty = False
        self._tail = np.zeros((0, self.dim), dtype=np.float32)  # capacity grows by doubling
        self._tail_rows = 0
        self.mapped = False
        self.gpu = None  # a device copy of `faiss` (index/gpu.py)
        self.modality_counts: tuple | None = None  # CalibrationCache.modality_counts' cache (index/calibration_cache.py)
        self.epoch = 0  # the numbering of its rows: how many times the document store had compacted it when read
        if faiss_index is not None:
            self.set_index(faiss_index)

    @classmethod
    def for_version(cls, seg_id: int, encoder: dict, base: vi.IndexChoice | None) -> "Segment":
        """An empty segment for the documents a newly activated encoder version embeds: HNSW
        where the index began as HNSW, otherwise exact (it starts empty and grows by adds)."""
        kind = "hnsw" if base is not None and base.kind == "hnsw" else "flat"
        choice = vi.choose_index(kind, 0, int(encoder["dim"]))
        choice.reason = f"segment for encoder version {encoder['version']} (new documents after an update)"
        record = {"id": seg_id, "encoder": encoder, "index": choice.to_dict(),
                  "faiss_file": layout.first_checkpoint(seg_id), "created": now()}
        seg = cls(record, vi.new_index(choice, int(encoder["dim"])))
        seg.dirty = True
        return seg

    def set_index(self, index) -> None:
        """Use `index` (loaded, built or compacted) and, on a GPU, a copy of it."""
        self.faiss, self.mapped = index, vi.is_mapped(index)
        choice = self.choice
        self.gpu = gpu.search_copy(index, choice.kind) if choice is not None else None

    @property
    def tail(self) -> np.ndarray:
        return self._tail[: self._tail_rows]

    @property
    def indexed_rows(self) -> int:
        """Rows searchable: in FAISS, and after a mapped checkpoint, in the tail."""
        return 0 if self.faiss is None else int(self.faiss.ntotal) + len(self.tail)

    def append(self, vectors: np.ndarray) -> None:
        """Make the next rows searchable (rows indexed_rows..)."""
        if self.mapped:  # a follower appends a few rows at a time: no copy of the whole tail each time
            need = self._tail_rows + len(vectors)
            if need > len(self._tail):
                grown = np.empty((max(need, 2 * len(self._tail), 1024), self.dim), dtype=np.float32)
                grown[: self._tail_rows] = self.tail
                self._tail = grown
            self._tail[self._tail_rows:need] = vectors
            self._tail_rows = need
        else:
            self.faiss.add(vectors)
            if self.gpu is not None:
                self.gpu.add(vectors)

    @property
    def id(self) -> int:
        return self.record["id"]

    @property
    def dim(self) -> int:
        return int(self.record["encoder"]["dim"])

    @property
    def choice(self) -> vi.IndexChoice | None:
        return vi.IndexChoice.from_dict(self.record["index"]) if self.record.get("index") else None

    def grow(self, n: int) -> None:
        if n > len(self.alive):
            extra = n - len(self.alive)
            self.alive = np.concatenate([self.alive, np.zeros(extra, dtype=bool)])
            self.codes = np.concatenate([self.codes, np.zeros(extra, dtype=np.uint8)])
