"""`umr index verify [--repair] [--full]`: every check an open makes, the document store's own,
FAISS's contents against the stored vectors, and every other file of the index (index/layout.py):
compensators and reference queries against their checksums, uploads against their names.

Without --repair nothing is written (the index is opened read-only, so a running server may
keep it); with it, the index is opened for writing, checkpoints that disagree with the document
store are rebuilt from it and saved, and damaged stored vectors are restored from checkpoints
that hold them exactly (index/vector_check.py). The document store is otherwise the only copy
of the documents and vectors: damage to its pages is reported as what --repair cannot repair.

A sample of rows per segment is compared with FAISS, and its documents decoded, by default;
every row with `full`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from umr.index import layout, side_files, vector_check, vector_file
from umr.index.docstore import DocStore
from umr.index.errors import IndexDamaged, IndexError_
from umr.index.layout import DOCSTORE
from umr.index.store import IndexStore

SAMPLE_ROWS = 1000  # per segment, without --full
CANNOT_REPAIR = ("docs.sqlite is damaged and --repair cannot rebuild it (it is the only copy of the documents and "
                 "vectors): restore docs.sqlite from a backup, then run verify again")


@dataclass
class VerifyReport:
    path: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)  # what --repair cannot mend, and what to do instead
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "checked": self.checked, "problems": self.problems,
                "repaired": self.repaired, "unrepairable": self.unrepairable, "fatal": self.fatal}


def verify(path: str | Path, repair: bool = False, full: bool = False, sample: int = SAMPLE_ROWS) -> VerifyReport:
    report = VerifyReport(str(path))
    try:
        store = IndexStore.open(path, "write" if repair else "read", repair=repair, check=False)
    except IndexDamaged as e:  # the store cannot even be read through: say what its own check finds
        return damaged_store(report, Path(path), e)
    except IndexError_ as e:
        report.fatal = str(e)
        return report
    try:
        return _checks(store, report, repair, full, sample)
    except IndexDamaged as e:  # a read met a damaged page: say what the store's own check finds
        return damaged_store(VerifyReport(str(path)), Path(path), e)
    finally:
        store.close()


def _checks(store: IndexStore, report: VerifyReport, repair: bool, full: bool, sample: int) -> VerifyReport:
    report.checked.append("manifest readable, document store present, belonging to this index and holding "
                          "every write the index acknowledged")
    bad = store.docs.integrity_problems()
    report.checked.append("document store integrity (SQLite integrity_check)")
    report.problems += [f"docs.sqlite: {p}" for p in bad[:20]]
    if bad:
        report.unrepairable.append(CANNOT_REPAIR)
    for seg in store.segments:
        docs = store.docs.docs_in_segment(seg.id)
        alive = int(seg.alive.sum())
        if docs != alive:
            report.problems.append(f"segment {seg.id}: {docs} documents point at it but {alive} of its rows are live")
        if seg.faiss is not None and seg.indexed_rows != len(seg.alive):
            report.problems.append(f"segment {seg.id}: FAISS holds {seg.indexed_rows} rows, the document store "
                                   f"{len(seg.alive)}")
    report.checked.append(f"{len(store.segments)} segments: FAISS checkpoints (size, SHA-256, rows, epoch, "
                          "dimension) against the document store, documents against live rows")
    compared = 0
    for seg in store.segments:
        rows = vector_check.rows_to_compare(seg, None if full else sample)
        compared += len(rows)
        blocks = store.docs.vectors.failing_blocks(seg.id, len(seg.alive))
        vector_check.check_segment(store, seg, rows, repair, report, vector_check.block_rows(blocks))
        if blocks and repair:
            blocks = store.docs.vectors.failing_blocks(seg.id, len(seg.alive))
        report.problems += vector_check.failing_block_problems(seg, blocks)
        raw = store.docs.raw_docs(seg.id, None if full else rows)
        for doc_id, why in unreadable(raw):
            report.problems.append(f"document {doc_id!r} (segment {seg.id}) cannot be read back ({why})")
            report.unrepairable.append(f"document {doc_id!r} cannot be read back: delete it and add it again")
        for doc_id, image in side_files.missing_uploads(store.path, raw):
            report.problems.append(f"document {doc_id!r}'s uploaded image {image} is missing")
            report.unrepairable.append(f"document {doc_id!r}'s image is missing: add the document again with it")
    _side_files(store, report, repair, full)
    if store.docs.vectors.kind == "files":
        report.checked.append("the vector files' checksums, every complete block of "
                              f"{vector_file.BLOCK_ROWS} rows")
    report.checked.append(f"FAISS contents against the stored vectors, and the stored documents decoding: {compared} "
                          f"rows ({'all' if full else f'a sample of up to {sample} per segment; --full checks all'})")
    if repair:
        report.repaired += store.repairs
        if store.repairs:
            store.save()
    else:
        report.problems += store.repairs
    return report


def _side_files(store: IndexStore, report: VerifyReport, repair: bool, full: bool) -> None:
    """The compensators, reference queries and uploads the index keeps beside its segments
    (index/side_files.py), and a `--ray` build's shards. --repair cannot write any of them
    again: the first two need the encoders, the uploads their senders."""
    named = list(side_files.recorded_files(store.manifest, store.path))
    for what, record, fix in named:
        found = side_files.problem(store.path, record)
        if found:
            report.problems.append(f"{what}: {found}")
            report.unrepairable.append(f"{what}: {fix}")
    hashed, bad = side_files.upload_problems(store.path, full)
    report.problems += bad
    if bad:
        report.unrepairable.append(f"{len(bad)} uploaded image(s) damaged: delete the documents that use them and "
                                   "add them again with their images")
    report.checked.append(f"{len(named)} compensator and reference files against their checksums; {hashed} uploaded "
                          f"images against the hashes they are named by{'' if full else ' (a sample; --full hashes all)'}")
    shards = store.path / layout.RAY_SHARDS
    if shards.is_dir() and store.ready:  # an unfinished build's shards are what its rerun resumes from
        left = f"{layout.RAY_SHARDS}/ is left from a finished --ray build; nothing reads it"
        if repair:
            shutil.rmtree(shards, ignore_errors=True)
            report.repaired.append(f"{left}: removed")
        else:
            report.problems.append(left)


def unreadable(raw) -> list[tuple[str, str]]:
    """(id, why) of the stored documents that cannot be read back: text that is not UTF-8,
    metadata that is not JSON (umr stores neither)."""
    bad = []
    for doc_id, text, meta, _image in raw:
        try:
            if text is not None:
                bytes(text).decode("utf-8")
            json.loads(bytes(meta).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            bad.append((bytes(doc_id).decode("utf-8", "backslashreplace"), f"{e.__class__.__name__}: {str(e)[:60]}"))
    return bad


def damaged_store(report: VerifyReport, path: Path, error: IndexDamaged) -> VerifyReport:
    docs = DocStore(str(path / DOCSTORE), read_only=True)
    try:
        found = docs.integrity_problems()
    finally:
        docs.close()
    report.checked.append("document store integrity (SQLite integrity_check); the index could not be opened")
    report.problems += [f"docs.sqlite: {p}" for p in found[:20]] or [str(error)]
    report.unrepairable.append(CANNOT_REPAIR)
    return report
