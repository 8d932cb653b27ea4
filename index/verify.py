"""`umr index verify [--repair]`: every check an open makes, and the document store's own.

Without --repair nothing is written (the index is opened read-only, so a running server may
keep it); with it, the index is opened for writing, checkpoints that disagree with the document
store are rebuilt from it and saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from index.errors import IndexError_
from index.store import IndexStore


@dataclass
class VerifyReport:
    path: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "checked": self.checked, "problems": self.problems,
                "repaired": self.repaired, "fatal": self.fatal}


def verify(path: str | Path, repair: bool = False) -> VerifyReport:
    report = VerifyReport(str(path))
    try:
        store = IndexStore.open(path, "write" if repair else "read", repair=repair)
    except IndexError_ as e:
        report.fatal = str(e)
        return report
    try:
        report.checked.append("manifest readable, document store present and belonging to this index")
        bad = store.docs.integrity_problems()
        report.checked.append("document store integrity (SQLite integrity_check)")
        report.problems += [f"docs.sqlite: {p}" for p in bad[:20]]
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
        if repair:
            report.repaired = list(store.repairs)
            if store.repairs:
                store.save()
        else:
            report.problems += store.repairs
    finally:
        store.close()
    return report
