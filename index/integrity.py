"""Index files that check themselves.

The document store (docs.sqlite, with the vector files beside it) is the truth: every document
and vector. A FAISS file is a
checkpoint of one segment's rows, recorded in the manifest with its size, SHA-256, row count and
the segment's epoch (how often it was compacted). On open a checkpoint that fails any of these is
rebuilt from the document store, with a message, instead of serving wrong scores or dropping
rows. The document store itself cannot be rebuilt from anything: a missing, damaged or foreign
one is refused with a one-line error that says what to do. The manifest and the document store
carry the same random id, so a docs.sqlite from another index is never taken for this one's.
"""
from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable

from umr.index import commit_mark, layout
from umr.index import vector_index as vi
from umr.index.atomic import atomic_write, file_sha256
from umr.index.docstore import DocStore
from umr.index.errors import IndexDamaged, IndexError_

log = logging.getLogger("umr.index")

DOCSTORE_ID = "docstore_id"  # the key in the manifest and in the document store's meta table
CHECKPOINT = "checkpoint"  # the key of a segment record's checkpoint facts
DOCSTORE_OLDER = "the document store is older than this FAISS checkpoint"
# Opening checks the document store with SQLite's integrity check up to this size (about 15 s
# per GB on 2 cores); a larger one is checked by `umr index verify` and by a server in the background.
OPEN_CHECK_MAX_BYTES = 2 << 30


def new_id() -> str:
    return uuid.uuid4().hex


def new_docstore(path: Path, manifest: dict, vector_dtype: str) -> DocStore:
    """A new index's document store, carrying the manifest's id and a commit mark from the start."""
    docs = DocStore(str(path), vector_dtype=vector_dtype)
    docs.set_meta(DOCSTORE_ID, manifest[DOCSTORE_ID])
    docs.keep_mark(commit_mark.MarkWriter(path, manifest[DOCSTORE_ID]))
    return docs


def file_identity(path: Path) -> tuple[int, int]:
    """(device, inode): which file a path names now. While a process holds a file open its inode
    cannot go to another file, so an identity it recorded stays the identity of that file."""
    st = path.stat()
    return st.st_dev, st.st_ino


def open_docstore(path: Path, manifest: dict, read_only: bool = False, check: bool = True,
                  accept_loss: Callable[[str], None] | None = None,
                  checked_file: tuple[int, int] | None = None) -> DocStore:
    """The index's document store, refused when it is missing, foreign, damaged (SQLite's own
    integrity check, run when `check` and the file is at most OPEN_CHECK_MAX_BYTES) or missing
    writes it acknowledged (index/commit_mark.py). `accept_loss` (verify --repair) takes the
    store as it is instead and is told what was lost. `checked_file`: the identity of a file
    this process checked and still holds open (a reader reopening after its writer compacted):
    that file is not checked again, since the reader that kept it open read it unchecked all
    along; a store that is another file now is checked."""
    if not path.exists():
        raise IndexError_(f"{path} is missing: it holds every document and vector of this index (the FAISS files "
                          "are only checkpoints of it); restore it from a backup")
    mark = commit_mark.read(path)  # before the store: a writer committing meanwhile only raises the store's count
    try:
        docs = DocStore(str(path), read_only=read_only)
        stored = docs.get_meta(DOCSTORE_ID)
    except sqlite3.DatabaseError as e:
        raise IndexError_(f"{path} is damaged ({e}); restore it from a backup "
                          f"(`umr index verify {path.parent}` says what else is intact)") from None
    expected = manifest.get(DOCSTORE_ID)
    if expected and stored != expected:
        docs.close()
        what = f"belongs to another index (id {stored})" if stored else "carries no index id"
        raise IndexError_(f"{path} {what}; this index's manifest expects {expected}. Put back this index's own "
                          "docs.sqlite, or open the folder it came from")
    if not expected:  # an index made before ids: adopt one (written with the next save)
        manifest[DOCSTORE_ID] = stored or new_id()
        if not stored and not read_only:
            docs.set_meta(DOCSTORE_ID, manifest[DOCSTORE_ID])
    try:
        identity = file_identity(path) if check else None
        if identity is not None and identity == checked_file:
            docs.checked_file = identity
        elif identity is not None and path.stat().st_size <= OPEN_CHECK_MAX_BYTES:
            started = time.perf_counter()
            refuse_if_damaged(docs, path)
            docs.checked_file = identity
            log.info("%s passed SQLite's integrity check in %.1f s", path, time.perf_counter() - started)
        lost = lost_commits(docs, manifest[DOCSTORE_ID], mark)
        if lost and accept_loss is None:
            raise IndexError_(lost_message(path, *lost))
        if lost:
            accept_loss(f"{path.name} holds {lost[0]} of the {lost[1]} writes this index acknowledged; accepted as "
                        f"it is: the documents of the last {lost[1] - lost[0]} writes are gone for good")
        if not read_only:
            same = mark is not None and mark.docstore_id == manifest[DOCSTORE_ID]
            docs.keep_mark(commit_mark.MarkWriter(path, manifest[DOCSTORE_ID]), mark.commits if same else None)
    except BaseException:
        docs.close()
        raise
    return docs


def refuse_if_damaged(docs: DocStore, path: Path) -> None:
    """SQLite's integrity check: pages, and every index against its table (8 bytes flipped at
    random left a row missing from an index, which the integrity check found and the quick
    check did not; a damaged index is how 595 documents of 1,200 were served as the whole
    store), in about 15 s per GB on 2 cores (14 s at 10M documents, bench/reopen.py)."""
    problems = docs.integrity_problems()
    if problems:
        raise IndexDamaged(
            f"{path} is damaged (SQLite's integrity check: {len(problems)} problem(s), first: {problems[0][:100]}); "
            f"it is the only copy of the documents and vectors, so restore it from a backup "
            f"(`umr index verify {path.parent}` lists what else is intact)")


def lost_commits(docs: DocStore, docstore_id: str, mark: "commit_mark.Mark | None") -> tuple[int, int] | None:
    """(writes the store holds, writes the index acknowledged) when it holds fewer, else None."""
    if mark is None or mark.docstore_id != docstore_id:
        return None
    have = docs.commits()
    return (have, mark.commits) if have < mark.commits else None


def lost_message(path: Path, have: int, acknowledged: int) -> str:
    return (f"{path} holds {have} committed writes but this index acknowledged {acknowledged}: the document store "
            f"is older than the rest of the index, its write-ahead log {path.name}-wal missing or older than it. Put "
            f"back the {path.name}-wal that belongs with it, or accept the store as it is with `umr index verify "
            f"{path.parent} --repair` (the documents of the last {acknowledged - have} writes are then gone)")


def unrecorded_checkpoints(index_dir: Path, manifest: dict) -> list[str]:
    recorded = {rec.get("faiss_file") for rec in manifest["segments"]}
    found = [p.relative_to(index_dir).as_posix() for p in (index_dir / layout.SEGMENTS).glob("*/index*.faiss")]
    return [f for f in found if f not in recorded]


def remove_checkpoints(index_dir: Path, names: list[str]) -> None:
    for name in names:
        try:
            (index_dir / name).unlink()
        except FileNotFoundError:
            pass


def adopt_pending(record: dict, pending: dict) -> None:
    """Make a segment record name the checkpoint a compaction wrote (and its document store
    recorded in the same transaction as the renumbering)."""
    record["faiss_file"] = pending["faiss_file"]
    record[CHECKPOINT] = {k: v for k, v in pending.items() if k != "faiss_file"}
    record["rows_checkpointed"] = pending["rows"]


def adopt_recorded_compaction(record: dict, pending: dict | None, epoch: int) -> None:
    """A compaction killed after its transaction but before the manifest named its checkpoint:
    the document store knows the checkpoint of its epoch, so the record takes it (and the next
    save writes it down) instead of rebuilding."""
    ck = record.get(CHECKPOINT)
    if pending and pending.get("epoch") == epoch and (ck is None or ck.get("epoch", 0) != epoch):
        adopt_pending(record, pending)


def write_checkpoint(index_dir: Path, seg_id: int, index, rows: int, epoch: int) -> tuple[str, dict]:
    """Write a segment's FAISS index atomically under a new name; (that name, its record).

    A new name per checkpoint, recorded by the manifest written after it: a crash in between
    leaves the manifest naming the previous file, still there and sound."""
    name = layout.new_checkpoint(seg_id)
    atomic_write(index_dir / name, lambda tmp: vi.write_index(index, tmp))
    return name, checkpoint_record(index_dir / name, rows, epoch)


def checkpoint_record(path: Path, rows: int, epoch: int) -> dict:
    return {"rows": int(rows), "bytes": path.stat().st_size, "sha256": file_sha256(path), "epoch": int(epoch)}


def checkpoint_problem(path: Path | None, record: dict) -> str | None:
    """Why the FAISS file cannot be trusted before reading it, or None."""
    ck = record.get(CHECKPOINT)
    if path is None or not path.exists():
        return "its FAISS checkpoint is missing" if ck else "it has no FAISS checkpoint yet"
    if ck is None:
        return None  # written by an older umr: checked by reading it
    size = path.stat().st_size
    if size != ck["bytes"]:
        return f"its FAISS checkpoint is {size} bytes, {ck['bytes']} were written (truncated or replaced)"
    if file_sha256(path) != ck["sha256"]:
        return "its FAISS checkpoint fails its checksum (damaged, or another index's file)"
    return None


def load_checkpoint(path: Path | None, record: dict, dim: int, n_rows: int, epoch: int, mapped: bool = False):
    """(FAISS index, None) when the checkpoint can be used, else (None, why); the why is
    DOCSTORE_OLDER when the checkpoint is sound but holds rows the document store lacks.
    `mapped`: leave an IVF index's lists in the file (vector_index.read_index)."""
    problem = checkpoint_problem(path, record)
    if problem:
        return None, None if problem == "it has no FAISS checkpoint yet" else problem
    ck = record.get(CHECKPOINT)
    if ck is not None and ck.get("epoch", 0) != epoch:
        return None, "the segment was compacted after its FAISS checkpoint"
    try:
        index = vi.read_index(str(path), mapped)
    except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with its C++ message
        return None, f"its FAISS checkpoint cannot be read ({str(e).splitlines()[0][:120]})"
    if index.d != dim:
        return None, f"its FAISS checkpoint has dimension {index.d}, the segment {dim}"
    if ck is not None and index.ntotal != ck["rows"]:
        return None, f"its FAISS checkpoint holds {index.ntotal} rows, {ck['rows']} were recorded"
    if index.ntotal > n_rows:
        if ck is not None:
            return None, DOCSTORE_OLDER
        return None, f"its FAISS checkpoint holds {index.ntotal} rows, the document store {n_rows}"
    return index, None


def older_docstore_message(index_dir: Path, seg_id: int, n_rows: int, record: dict) -> str:
    return (f"{index_dir}/docs.sqlite holds {n_rows} rows of segment {seg_id}, its FAISS checkpoint "
            f"{record[CHECKPOINT]['rows']}: the document store is older than the rest of the index (restored from "
            "an older backup?). Put back the matching docs.sqlite, or accept it as it is with "
            f"`umr index verify {index_dir} --repair` (documents added after it was saved are then gone)")
