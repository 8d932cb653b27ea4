"""Where a document store keeps its rows' vectors: files beside it (FileVectors), or, in an index
made before umr 0.9, a column of its rows table (SqliteVectors, kept so such indexes still open
and grow as they are).

Both are driven by DocStore inside its transactions: `insert` and `compact` run in the one
that commits the rows, so a row exists with its vector or not at all.
"""
from __future__ import annotations

import itertools

import numpy as np

from umr.index import vector_file as vf
from umr.index.vector_file import BLOCK_ROWS, SegmentFile


class SqliteVectors:
    """Vectors as float32 blobs in rows.vec (indexes made before the vector files)."""

    kind = "docs.sqlite"
    dtype = "float32"

    def __init__(self, docs):
        self.docs = docs

    def as_stored(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def insert(self, cur, segment: int, first_row: int, codes: list[int], vectors: np.ndarray) -> None:
        vectors = self.as_stored(vectors)
        cur.executemany("INSERT INTO rows(segment, row, modality, alive, vec) VALUES(?,?,?,1,?)",
                        ((segment, first_row + i, code, vec.tobytes()) for i, (code, vec) in enumerate(zip(codes, vectors))))

    def read(self, segment: int, rows: np.ndarray) -> np.ndarray:
        out = []
        with self.docs.lock:
            for i in range(0, len(rows), 500):
                chunk = [int(r) for r in rows[i : i + 500]]
                got = dict(self.docs._db.execute(
                    f"SELECT row, vec FROM rows WHERE segment=? AND row IN ({','.join('?' * len(chunk))})",
                    (segment, *chunk)).fetchall())
                out.extend(np.frombuffer(got[r], dtype=np.float32) for r in chunk)
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def read_range(self, segment: int, start: int, stop: int) -> np.ndarray:
        with self.docs.lock:
            found = self.docs._db.execute("SELECT vec FROM rows WHERE segment=? AND row>=? AND row<? ORDER BY row",
                                          (segment, start, stop)).fetchall()
        if len(found) != stop - start:
            raise KeyError(f"segment {segment} lacks rows of {start}..{stop - 1}")
        return np.stack([np.frombuffer(v, dtype=np.float32) for (v,) in found]) if found else \
            np.zeros((0, 0), dtype=np.float32)

    def overwrite(self, cur, segment: int, rows: np.ndarray, vectors: np.ndarray) -> None:
        cur.executemany("UPDATE rows SET vec=? WHERE segment=? AND row=?",
                        [(v.tobytes(), segment, int(r)) for r, v in zip(rows, self.as_stored(vectors))])

    def compact(self, cur, segment: int, live: np.ndarray, epoch: int) -> None:
        """Nothing to do: the renumbering moves the blobs with their rows."""

    def compacted(self, segment: int, epoch: int) -> None:
        pass

    def missing(self, segment: int, n_rows: int) -> int | None:
        return None

    def failing_blocks(self, segment: int, n_rows: int) -> list[int]:
        return []

    def close(self) -> None:
        pass


class FileVectors:
    """Vectors in segments/<id>/vectors.<epoch>.<f32|f16> (index/vector_file.py)."""

    kind = "files"

    def __init__(self, docs, root, dtype: str, writable: bool):
        self.docs, self.root, self.dtype, self.writable = docs, root, vf.check_dtype(dtype), writable
        self._files: dict[int, SegmentFile] = {}

    def as_stored(self, vectors: np.ndarray) -> np.ndarray:
        """The vectors in the file's own dtype, written as they are (float16 is converted once)."""
        return np.ascontiguousarray(vectors, dtype=self.dtype)

    def file(self, segment: int, epoch: int | None = None) -> SegmentFile:
        """The segment's file in the numbering this process uses (its epoch when first asked:
        a reader keeps it until it reopens; the writer moves on in `compacted`)."""
        f = self._files.get(segment)
        if f is None or (epoch is not None and epoch != self._epoch_of(f)):
            epoch = self.docs.epoch(segment) if epoch is None else epoch
            dim = self.docs.get_meta(vf.DIM_KEY.format(segment))
            f = SegmentFile(self.root / vf.file_name(segment, epoch, self.dtype), self.dtype,
                            int(dim) if dim else None, self.writable)
            self._files[segment] = f
        return f

    @staticmethod
    def _epoch_of(f: SegmentFile) -> int:
        return int(f.path.name.split(".")[1])

    def insert(self, cur, segment: int, first_row: int, codes: list[int], vectors: np.ndarray) -> None:
        f = self.file(segment)
        new_dim = f.dim is None
        f.write(first_row, vectors)
        if new_dim:
            cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)", (vf.DIM_KEY.format(segment), str(f.dim)))
        cur.executemany("INSERT INTO rows(segment, row, modality, alive) VALUES(?,?,?,1)",
                        zip(itertools.repeat(segment), range(first_row, first_row + len(codes)), codes))
        self._sum(cur, segment, f, vf.complete_blocks(first_row, first_row + len(codes)))

    def _sum(self, cur, segment: int, f: SegmentFile, blocks) -> None:
        cur.executemany("INSERT OR REPLACE INTO vector_sums(segment, block, crc) VALUES(?,?,?)",
                        [(segment, b, f.block_crc(b)) for b in blocks])

    def read(self, segment: int, rows: np.ndarray) -> np.ndarray:
        return self.file(segment).read(rows)

    def read_range(self, segment: int, start: int, stop: int) -> np.ndarray:
        return self.file(segment).read_range(start, stop)

    def overwrite(self, cur, segment: int, rows: np.ndarray, vectors: np.ndarray) -> None:
        f = self.file(segment)
        stored = np.ascontiguousarray(vectors, dtype=self.dtype)
        for r, v in zip(rows, stored):
            f.write(int(r), v[None])
        n_rows = self.docs.row_count(segment)
        blocks = sorted({int(r) // BLOCK_ROWS for r in rows if (int(r) // BLOCK_ROWS + 1) * BLOCK_ROWS <= n_rows})
        self._sum(cur, segment, f, blocks)

    def compact(self, cur, segment: int, live: np.ndarray, epoch: int) -> None:
        """Write the live rows, in order, as the file of `epoch` and their checksums; the
        caller's transaction makes it the one in use."""
        old = self.file(segment)
        new = SegmentFile(self.root / vf.file_name(segment, epoch, self.dtype), self.dtype, old.dim, True)
        try:
            new.cut(0)
            for start in range(0, len(live), 65536):
                rows = live[start:start + 65536]
                first, last = int(rows[0]), int(rows[-1]) + 1
                new.write(start, old.stored_range(first, last)[rows - first])
            cur.execute("DELETE FROM vector_sums WHERE segment=?", (segment,))
            self._sum(cur, segment, new, vf.complete_blocks(0, len(live)))
        finally:
            new.close()

    def compacted(self, segment: int, epoch: int) -> None:
        """After the compaction committed: use the new file, delete the old one."""
        old = self._files.pop(segment, None)
        if old is not None:
            old.close()
            if self._epoch_of(old) != epoch:
                old.path.unlink(missing_ok=True)
        self.file(segment, epoch)

    def abandon(self, segment: int, epoch: int) -> None:
        """A compaction that did not commit: its file goes."""
        (self.root / vf.file_name(segment, epoch, self.dtype)).unlink(missing_ok=True)

    def missing(self, segment: int, n_rows: int) -> int | None:
        """The rows the file holds when that is fewer than the `n_rows` committed, else None;
        the writer cuts off what lies past them, and files of other epochs."""
        f = self.file(segment)
        on_disk = f.rows_on_disk() if f.dim else (0 if n_rows == 0 else None)
        if on_disk is None:
            on_disk = 0
        if self.writable:
            if on_disk > n_rows:
                f.cut(n_rows)
            for other in (self.root / "segments" / str(segment)).glob("vectors.*"):
                if other.name != f.path.name:
                    other.unlink(missing_ok=True)
        return on_disk if on_disk < n_rows else None

    def failing_blocks(self, segment: int, n_rows: int) -> list[int]:
        """Complete blocks whose checksum is not what was committed (or was never recorded)."""
        f = self.file(segment)
        with self.docs.lock:
            sums = dict(self.docs._db.execute("SELECT block, crc FROM vector_sums WHERE segment=?", (segment,)))
        return [b for b in range(n_rows // BLOCK_ROWS) if sums.get(b) != f.block_crc(b)]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
