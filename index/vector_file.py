"""Each segment's exact vectors in an array file of its own, beside the document store.

Why not inside docs.sqlite, where they were: at 10M x 256 the vectors made 10 GB of B-tree
pages (14.4 GiB on disk in all), every query's re-scoring looked up 100 of them one by one, and
reading (alive, modality) of every row at open dragged their pages along. A flat file is read
by row number from a memory map, may hold float16 (half the disk, cosine 0.9999 to float32),
and leaves the document store to the documents.

Crash safety without a second journal: a batch's vectors are written at their own offset and
fsync'd inside the SQLite transaction that makes their rows exist, before it commits. A crash
in between leaves bytes past the committed rows, which the next write overwrites and the
writer's next open cuts off; no reader looks past the rows the store has committed. A
compaction writes a new file named by the segment's next epoch; the transaction that renumbers
the rows makes it the one in use.

Checksums: a CRC-32 per block of BLOCK_ROWS rows, committed in the same transaction as the rows
that complete the block (table vector_sums), so `umr index verify` tells damaged rows in the
file from a FAISS checkpoint that disagrees with them. The last, incomplete block is checked as
before: every stored vector has unit length, and FAISS holds a copy.
"""
from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import numpy as np

from umr.index import layout
from umr.index.atomic import FILE_MODE, fsync_dir
from umr.index.errors import IndexDamaged, InvalidArgument

BLOCK_ROWS = 4096
DTYPES = {"float32": "f32", "float16": "f16"}  # storage type -> file suffix
DEFAULT_DTYPE = "float32"
DTYPE_KEY = "vector_dtype"  # meta keys of the document store
DIM_KEY = "vector_dim:{}"
SUMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS vector_sums(segment INTEGER NOT NULL, block INTEGER NOT NULL, crc INTEGER NOT NULL,
                                       PRIMARY KEY(segment, block)) WITHOUT ROWID;
"""


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise InvalidArgument(f"unknown vector storage type {name!r}: use {' or '.join(DTYPES)}")
    return name


def file_name(segment: int, epoch: int, dtype: str) -> str:
    """The file's path inside the index directory."""
    return f"{layout.segment_dir(segment)}/vectors.{epoch}.{DTYPES[dtype]}"


class SegmentFile:
    """One segment's vectors at one epoch: positional writes and plain positional reads through
    one open descriptor, so a reader keeps its numbering's file after a writer's compaction has
    unlinked it. Not a memory map: the kernel's read-ahead around each mapped row left 5.6 GB of
    the file counted as a 10M-vector server's resident memory, where reads leave it to the page
    cache (measured: bench/large.py)."""

    def __init__(self, path: Path, dtype: str, dim: int | None, writable: bool):
        self.path, self.dtype, self.dim, self.writable = path, np.dtype(dtype), dim, writable
        self._fd: int | None = None
        self._lock = threading.Lock()

    @property
    def row_bytes(self) -> int:
        return int(self.dim) * self.dtype.itemsize

    def _descriptor(self, create: bool = False) -> int | None:
        with self._lock:
            return self._open(create)

    def _open(self, create: bool) -> int | None:
        if self._fd is None:
            if not self.path.exists() and not create:
                return None
            new = create and not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = (os.O_RDWR | os.O_CREAT) if self.writable else os.O_RDONLY
            self._fd = os.open(self.path, flags, FILE_MODE)
            if new:
                fsync_dir(self.path.parent)
        return self._fd

    def rows_on_disk(self) -> int | None:
        """Whole rows the file holds; None when there is no file."""
        fd = self._descriptor()
        return None if fd is None or not self.dim else os.fstat(fd).st_size // self.row_bytes

    def write(self, first_row: int, vectors: np.ndarray) -> None:
        """Rows first_row.. on disk (fsync'd) before the caller commits them."""
        data = np.ascontiguousarray(vectors, dtype=self.dtype)
        if self.dim is None:
            self.dim = data.shape[1]
        fd = self._descriptor(create=True)
        os.pwrite(fd, memoryview(data).cast("B"), first_row * self.row_bytes)
        os.fsync(fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows in any order, as float32: one plain read per run of consecutive rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        wanted, where = np.unique(rows, return_inverse=True)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        data = b"".join(self._pread(int(run[0]), int(run[-1]) + 1) for run in np.split(wanted, breaks))
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, self.dim)[where].astype(np.float32)

    def _pread(self, start: int, stop: int) -> bytes:
        """Rows start..stop-1 as stored, by a plain read: a scan through the memory map would
        leave the whole file counted in the process's resident memory (6 GB at 10M x 256)."""
        fd = self._descriptor()
        want = (stop - start) * self.row_bytes
        data = os.pread(fd, want, start * self.row_bytes) if fd is not None else b""
        if len(data) < want:
            raise IndexDamaged(f"{self.path} holds {start + len(data) // self.row_bytes} vectors where {stop} were "
                               "committed (truncated or replaced); run `umr index verify --repair` on the index")
        return data

    def stored_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in the stored type."""
        return np.frombuffer(self._pread(start, stop), dtype=self.dtype).reshape(-1, self.dim)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return self.stored_range(start, stop).astype(np.float32)

    def block_crc(self, block: int) -> int:
        return zlib.crc32(self._pread(block * BLOCK_ROWS, (block + 1) * BLOCK_ROWS))

    def cut(self, rows: int) -> None:
        """Drop what lies past the committed rows (a write whose transaction never committed)."""
        fd = self._descriptor()
        if fd is not None and self.dim and os.fstat(fd).st_size > rows * self.row_bytes:
            os.ftruncate(fd, rows * self.row_bytes)
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def complete_blocks(first_row: int, stop: int) -> range:
    """The blocks that rows first_row..stop-1 complete."""
    return range(first_row // BLOCK_ROWS, stop // BLOCK_ROWS)
