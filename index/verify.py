"""`umr index verify [--repair] [--full]`: every check an open makes, the document store's own,
and FAISS's contents against the stored vectors.

Without --repair nothing is written (the index is opened read-only, so a running server may
keep it); with it, the index is opened for writing, checkpoints that disagree with the document
store are rebuilt from it and saved. The document store is the only copy of the documents and
vectors: nothing can rebuild it, so damage to it is reported as what --repair cannot repair.

A FAISS file whose size and checksum match its manifest record can still hold other vectors
(written by another tool, or tampered with together with its record): only comparing its rows
with the stored vectors finds that. A sample of rows per segment is compared by default, every
row with `full`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.docstore import DocStore
from index.errors import IndexDamaged, IndexError_
from index.store import DOCSTORE, IndexStore, Segment

SAMPLE_ROWS = 1000  # per segment, without --full
TOLERANCE = 1e-4  # largest difference per coordinate between a FAISS row and what its stored vector gives
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
        n, wrong = compare_faiss(store, seg, None if full else sample)
        compared += n
        if wrong:
            what = (f"segment {seg.id}: {len(wrong)} of {n} rows compared differ between FAISS and the stored "
                    f"vectors (rows {', '.join(map(str, wrong[:5]))}{', ...' if len(wrong) > 5 else ''})")
            if repair:
                store.rebuild(seg, what)
            else:
                report.problems.append(f"{what}; --repair rebuilds FAISS from the document store")
    report.checked.append(f"FAISS contents against the stored vectors: {compared} rows "
                          f"({'all' if full else f'a sample of up to {sample} per segment; --full compares all'})")
    if repair:
        report.repaired = list(store.repairs)
        if store.repairs:
            store.save()
    else:
        report.problems += store.repairs
    return report


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


def compare_faiss(store: IndexStore, seg: Segment, sample: int | None, seed: int = 0) -> tuple[int, list[int]]:
    """(rows compared, rows whose FAISS entry is not what their stored vector gives). An IVF-PQ
    row is compared with the stored vector's own PQ encoding, decoded: what FAISS must hold."""
    if seg.faiss is None or seg.faiss.ntotal == 0:
        return 0, []
    index = seg.faiss
    n = int(index.ntotal)  # rows after a mapped checkpoint are read from the store itself (its tail)
    rows = np.arange(n) if sample is None or sample >= n else \
        np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    wrong: list[int] = []
    try:
        for start in range(0, len(rows), 8192):
            chunk = rows[start:start + 8192]
            stored = np.ascontiguousarray(store.docs.vectors_at(seg.id, chunk), dtype=np.float32)
            want = stored if ivf is None else index.sa_decode(index.sa_encode(stored))
            got = index.reconstruct_batch(chunk.astype(np.int64))
            wrong += [int(r) for r in chunk[np.abs(got - want).max(axis=1) > TOLERANCE]]
    finally:
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return len(rows), wrong
