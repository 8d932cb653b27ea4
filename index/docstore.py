"""SQLite document store: documents, their rows and the build cursor, in one transaction each.

Each row's vector is kept beside it (index/vector_rows.py: a file per segment, written inside
the transaction that commits the row). The FAISS file is a checkpoint that can be rebuilt or
caught up from these rows, so a document is durable the moment its transaction commits, and
the whole corpus can be re-read for compensator calibration or re-training a quantizer.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np

from umr.index import vector_file
from umr.index.document_rules import check_document
from umr.index.documents import DocRecord, PlainDocs, modality_codes, validate_filter
from umr.index.docstore_reads import ReaderReads
from umr.index.docstore_schema import ROWS, ROWS_WITH_VECTORS, SCHEMA
from umr.index.row_state import read_row_state
from umr.index.damage import damage_as_error
from umr.index.errors import ReaderBehind
from umr.index.vector_rows import FileVectors, SqliteVectors

ID_CHUNK = 900  # ids per "IN (...)" lookup: under SQLite's oldest limit of 999 parameters
COMMITS = "commits"  # meta key: write transactions committed (index/commit_mark.py)


class DocStore(ReaderReads):
    """`vector_dtype` (float32 or float16): how a new store keeps its vectors; an existing one
    keeps what it was made with."""

    def __init__(self, path: str, read_only: bool = False, vector_dtype: str = vector_file.DEFAULT_DTYPE):
        self.path = path
        self.lock = threading.RLock()
        if read_only:
            self._db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("SELECT count(*) FROM meta").fetchone()  # fails now, not later, if damaged
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            if not self._has_table("rows"):
                self._db.executescript(ROWS + vector_file.SUMS_SCHEMA)
                self.set_meta(vector_file.DTYPE_KEY, vector_file.check_dtype(vector_dtype))
            elif not self._rows_hold_vectors():
                self._db.executescript(vector_file.SUMS_SCHEMA)
            else:
                self._db.executescript(ROWS_WITH_VECTORS)
        self.vectors = SqliteVectors(self) if self._rows_hold_vectors() else FileVectors(
            self, Path(path).parent, self.get_meta(vector_file.DTYPE_KEY, vector_file.DEFAULT_DTYPE),
            writable=not read_only)
        # The file (integrity.file_identity) that passed SQLite's integrity check when it was opened.
        self.checked_file: tuple[int, int] | None = None
        self._mark = None  # the writer's commit mark (index/commit_mark.py)
        self._commits = 0

    @property
    def checked(self) -> bool:
        """Whether SQLite's integrity check passed when the store was opened (in this process)."""
        return self.checked_file is not None

    def _has_table(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def _rows_hold_vectors(self) -> bool:
        return any(col[1] == "vec" for col in self._db.execute("PRAGMA table_info(rows)"))

    def close(self) -> None:
        with self.lock:
            self.vectors.close()
            self._db.close()
            if self._mark is not None:
                self._mark.close()

    # -- the commit count (index/commit_mark.py) ----------------------------------------
    def commits(self) -> int:
        """Write transactions committed into this store, as the store itself holds them."""
        return int(self.get_meta(COMMITS, "0"))

    def keep_mark(self, mark, on_disk: int | None = None) -> None:
        """Count every commit from now on in `mark` (a commit_mark.MarkWriter) too; it is
        written now unless it already holds this store's count (`on_disk`)."""
        with self.lock:
            self._commits = self.commits()
            self._mark = mark
            if on_disk != self._commits:
                mark.write(self._commits, sync=True)

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction (all or nothing), counted in the store with the rest of it and,
        once committed, in the commit mark."""
        with self.lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("INSERT INTO meta(key, value) VALUES(?, '1') ON CONFLICT(key) DO UPDATE "
                            "SET value = CAST(value AS INTEGER) + 1", (COMMITS,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._commits += 1
            if self._mark is not None:
                self._mark.write(self._commits)

    def checkpoint_wal(self) -> tuple[int, int, int]:
        """Copy what the WAL holds into docs.sqlite without waiting for readers (PASSIVE):
        (busy, frames in the WAL, frames copied). SQLite does this by itself only once the WAL
        reaches 1,000 pages, so a slowly written index kept its recent documents in the WAL alone."""
        with self.lock:
            if self._mark is not None:
                self._mark.write(self._commits, sync=True)
            return tuple(self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())

    # -- writes -------------------------------------------------------------------------
    def add(self, segment: int, first_row: int, docs: list[DocRecord] | PlainDocs, vectors: np.ndarray,
            meta: dict[str, str] | None = None, fresh: bool = False,
            codes: list[int] | None = None) -> list[tuple[int, int]]:
        """Insert docs as rows first_row.. of `segment`; replaces documents with the same id.
        `codes`: their modality codes, where the caller has them already (IndexStore.add).

        Returns the (segment, row) of every replaced document, whose row is now dead.
        One transaction: either every doc (and the meta cursor) lands or none does. `fresh`: the
        caller has made sure no id is stored yet (a build's accept), so none is looked up; were
        one stored after all, the id's PRIMARY KEY refuses the whole batch.
        """
        rows = _doc_rows(segment, first_row, docs)
        replaced: list[tuple[int, int]] = []
        with self._transaction() as cur:
            # One lookup per ID_CHUNK ids and one statement per table: per-row statements were
            # most of an import's time (5,778 vectors/s at 10M).
            ids = [] if fresh else docs.ids if isinstance(docs, PlainDocs) else [doc.id for doc in docs]
            for start in range(0, len(ids), ID_CHUNK):
                part = ids[start : start + ID_CHUNK]
                for old in cur.execute(f"SELECT segment, row FROM docs WHERE id IN ({','.join('?' * len(part))})",
                                       part).fetchall():
                    replaced.append(tuple(old))
            if replaced:
                cur.executemany("UPDATE rows SET alive=0 WHERE segment=? AND row=?", replaced)
                cur.executemany("INSERT INTO deaths(segment, row) VALUES(?,?)", replaced)
                cur.executemany("DELETE FROM docs WHERE segment=? AND row=?", replaced)
            cur.executemany("INSERT INTO docs(id, segment, row, modality, text, image, metadata) VALUES(?,?,?,?,?,?,?)",
                            rows)
            if len(docs):  # a batch whose every record was rejected commits only its cursor
                self.vectors.insert(cur, segment, first_row, modality_codes(docs) if codes is None else codes, vectors)
            for k, v in (meta or {}).items():
                cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)", (k, v))
        return replaced

    def delete(self, ids: Iterable[str]) -> list[tuple[str, int, int]]:
        gone = []
        with self._transaction() as cur:
            for doc_id in ids:
                old = cur.execute("SELECT segment, row FROM docs WHERE id=?", (doc_id,)).fetchone()
                if old is None:
                    continue
                cur.execute("DELETE FROM docs WHERE id=?", (doc_id,))
                cur.execute("UPDATE rows SET alive=0 WHERE segment=? AND row=?", old)
                cur.execute("INSERT INTO deaths(segment, row) VALUES(?,?)", old)
                gone.append((doc_id, old[0], old[1]))
        return gone

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)", (key, value))

    def compact(self, segment: int, checkpoint: dict | None = None) -> int:
        """Drop the segment's dead rows and number the live ones 0.. in their old order, in one
        transaction; bumps the segment's epoch so FAISS checkpoints of the old numbering are
        known stale, and records `checkpoint` (the one of the new numbering, already written)
        in the same transaction, as the vector file of the new numbering. Returns the rows dropped."""
        epoch = self.epoch(segment) + 1
        try:
            with self._transaction() as cur:
                dead = self._compact(cur, segment, checkpoint, epoch)
        except BaseException:
            if isinstance(self.vectors, FileVectors):
                self.vectors.abandon(segment, epoch)
            raise
        self.vectors.compacted(segment, epoch)
        return int(dead)

    def _compact(self, cur, segment: int, checkpoint: dict | None, epoch: int) -> int:
        dead = cur.execute("SELECT count(*) FROM rows WHERE segment=? AND alive=0", (segment,)).fetchone()[0]
        live = np.array([r for (r,) in cur.execute("SELECT row FROM rows WHERE segment=? AND alive=1 ORDER BY row",
                                                   (segment,))], dtype=np.int64)
        self.vectors.compact(cur, segment, live, epoch)
        cur.execute("DROP TABLE IF EXISTS temp.remap")
        cur.execute("CREATE TEMP TABLE remap(old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        cur.execute("INSERT INTO remap(old, new) SELECT row, ROW_NUMBER() OVER (ORDER BY row) - 1 "
                    "FROM rows WHERE segment=? AND alive=1", (segment,))
        cur.execute("DELETE FROM rows WHERE segment=? AND alive=0", (segment,))
        cur.execute("DELETE FROM deaths WHERE segment=?", (segment,))  # readers reopen: new epoch
        # Through negative numbers, so no renumbered row collides with one not yet renumbered.
        for table in ("rows", "docs"):
            cur.execute(f"UPDATE {table} SET row = -1 - (SELECT new FROM remap WHERE old = {table}.row) "
                        "WHERE segment=?", (segment,))
            cur.execute(f"UPDATE {table} SET row = -1 - row WHERE segment=?", (segment,))
        cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)", (f"epoch:{segment}", str(epoch)))
        if checkpoint is not None:
            cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)",
                        (f"checkpoint:{segment}", json.dumps(checkpoint)))
        cur.execute("DROP TABLE temp.remap")
        return dead

    def vacuum(self) -> None:
        with self.lock:
            self._db.execute("VACUUM")

    def integrity_problems(self) -> list[str]:
        """SQLite's integrity check: [] when whole (a check that cannot finish is a problem too)."""
        with self.lock:
            try:
                rows = [r[0] for r in self._db.execute("PRAGMA integrity_check").fetchall()]
            except sqlite3.DatabaseError as e:
                return [f"the integrity check itself failed: {e}"]
        return [] if rows == ["ok"] else rows

    # -- reads --------------------------------------------------------------------------
    def pending_checkpoint(self, segment: int) -> dict | None:
        """The FAISS checkpoint the segment's last compaction recorded with its renumbering."""
        raw = self.get_meta(f"checkpoint:{segment}")
        return json.loads(raw) if raw else None

    def epoch(self, segment: int) -> int:
        """How many times the segment was compacted: the numbering its rows are in."""
        return int(self.get_meta(f"epoch:{segment}", "0"))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    @damage_as_error
    def get(self, doc_id: str) -> tuple[DocRecord, int, int] | None:
        with self.lock:
            r = self._db.execute(
                "SELECT id, modality, text, image, metadata, segment, row FROM docs WHERE id=?", (doc_id,)
            ).fetchone()
        if r is None:
            return None
        return DocRecord(r[0], r[1], r[2], r[3], json.loads(r[4])), r[5], r[6]

    @damage_as_error
    def docs_at(self, segment: int, rows: Iterable[int], epoch: int) -> dict[int, DocRecord]:
        """The documents at `rows` of `segment` numbered as in `epoch`, the numbering the
        caller's segment was read in (ReaderBehind where the writer has renumbered it since)."""
        rows = [int(r) for r in rows]
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        with self.lock:
            found = self._db.execute(
                f"SELECT row, id, modality, text, image, metadata FROM docs WHERE segment=? AND row IN ({marks})",
                (segment, *rows),
            ).fetchall()
        self.check_numbering(segment, epoch)
        return {r[0]: DocRecord(r[1], r[2], r[3], r[4], json.loads(r[5])) for r in found}

    def check_numbering(self, segment: int, epoch: int) -> None:
        """Refuse rows just read (here, or by `get`) when the segment is no longer numbered as in
        `epoch`. Called after the read: epochs only grow, and the caller's segment was read at
        `epoch`, so an unchanged epoch now means the rows were read in that numbering too."""
        if self.epoch(segment) != epoch:
            raise ReaderBehind(segment)

    @damage_as_error
    def has_ids(self, ids: list[str]) -> set[str]:
        out: set[str] = set()
        with self.lock:
            for i in range(0, len(ids), ID_CHUNK):
                chunk = ids[i : i + ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                out.update(r[0] for r in self._db.execute(f"SELECT id FROM docs WHERE id IN ({marks})", chunk))
        return out

    @damage_as_error
    def row_count(self, segment: int) -> int:
        with self.lock:
            r = self._db.execute("SELECT COALESCE(MAX(row)+1, 0) FROM rows WHERE segment=?", (segment,)).fetchone()
        return int(r[0])

    @damage_as_error
    def docs_in_segment(self, segment: int) -> int:
        with self.lock:
            return int(self._db.execute("SELECT count(*) FROM docs WHERE segment=?", (segment,)).fetchone()[0])

    @damage_as_error
    def doc_count(self) -> int:
        with self.lock:
            return int(self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    @damage_as_error
    def row_state(self, segment: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(alive mask, modality codes) for rows 0..n_rows-1 of a segment."""
        with self.lock:
            return read_row_state(self._db, segment, n_rows)

    @damage_as_error
    def iter_vectors(self, segment: int, start: int = 0, chunk: int = 8192) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, vectors) in row order from `start`, `chunk` rows at a time."""
        stop = self.row_count(segment)
        for row in range(start, stop, chunk):
            yield row, self.vectors.read_range(segment, row, min(stop, row + chunk))

    @damage_as_error
    def vectors_at(self, segment: int, rows: np.ndarray) -> np.ndarray:
        return self.vectors.read(segment, np.asarray(rows, dtype=np.int64))

    @damage_as_error
    def rows_matching(self, segment: int, flt: dict, epoch: int) -> np.ndarray:
        """Rows of `segment` whose metadata equals every (key, value) of the filter, numbered
        as in `epoch` (as docs_at)."""
        clauses, args = [], [segment]
        for key, value in validate_filter(flt).items():
            clauses.append("json_extract(metadata, ?) = ?")
            args += [f'$."{key}"', int(value) if isinstance(value, bool) else value]
        sql = "SELECT row FROM docs WHERE segment=?" + "".join(f" AND {c}" for c in clauses)
        with self.lock:
            rows = np.array([r[0] for r in self._db.execute(sql, args)], dtype=np.int64)
        self.check_numbering(segment, epoch)
        return rows

    @damage_as_error
    def raw_docs(self, segment: int, rows: Iterable[int] | None = None) -> list[tuple[bytes, bytes | None, bytes, str | None]]:
        """(id, text, metadata) as stored bytes, and the image, of the segment's documents (of `rows`,
        or all): what `umr index verify` decodes, and whose uploaded images it looks for."""
        with self.lock:
            wanted = [r[0] for r in self._db.execute("SELECT row FROM docs WHERE segment=?", (segment,))] \
                if rows is None else [int(r) for r in rows]
        out = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            with self.lock:
                out += self._db.execute(f"SELECT CAST(id AS BLOB), CAST(text AS BLOB), CAST(metadata AS BLOB), image FROM docs "
                                        f"WHERE segment=? AND row IN ({marks})", (segment, *chunk)).fetchall()
        return out

    def put_vectors(self, segment: int, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Write vectors over the stored ones of `rows` (a repair restoring damaged rows), in one
        counted transaction."""
        with self._transaction() as cur:
            self.vectors.overwrite(cur, segment, np.asarray(rows, dtype=np.int64), vectors)

    @damage_as_error
    def iter_docs(self, segment: int | None = None) -> Iterator[DocRecord]:
        sql = "SELECT id, modality, text, image, metadata FROM docs"
        args: tuple = ()
        if segment is not None:
            sql += " WHERE segment=?"
            args = (segment,)
        with self.lock:
            found = self._db.execute(sql + " ORDER BY segment, row", args).fetchall()
        for r in found:
            yield DocRecord(r[0], r[1], r[2], r[3], json.loads(r[4]))


def _doc_rows(segment: int, first_row: int, docs: list[DocRecord] | PlainDocs):
    """The docs table's rows for `docs` stored from `first_row` on, each document checked
    unless its caller checked it (checked_metadata); plain ids are zipped, not looped over."""
    rows = range(first_row, first_row + len(docs))
    if isinstance(docs, PlainDocs):
        return zip(docs.ids, itertools.repeat(segment), rows, itertools.repeat(docs.modality), itertools.repeat(None),
                   itertools.repeat(None), itertools.repeat("{}"))
    return [(doc.id, segment, row, doc.modality, doc.text, doc.image,
             doc.checked_metadata if doc.checked_metadata is not None else
             check_document(doc.id, doc.text, doc.metadata, doc.image)) for doc, row in zip(docs, rows)]
