"""The steps every kind of build shares, batch by batch: numbering the corpus, cutting it in
batches, deciding which rows are indexed, committing a batch with its cursor.

Apart from retrieval/indexing/pipeline.py so that the Ray build (retrieval/indexing/distributed_build.py) and the
import of precomputed vectors (retrieval/indexing/vector_import.py) use them without importing the
pipeline that calls them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from umr.index.build_journal import BuildJournal
from umr.index.documents import DocRecord, PlainDocs
from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore
from umr.retrieval.images import BadImage
from umr.retrieval.items import Item
from umr.retrieval.corpus.readers import Rejected

MAX_REPORTED = 1000


class StrictError(InvalidArgument):
    """A bad record under --strict."""


@dataclass
class BuildReport:
    corpus: str
    read: int = 0
    indexed: int = 0
    rejected: int = 0
    rejections: list[dict] = field(default_factory=list)
    resumed_at: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    ray: dict | None = None  # what the Ray cluster did (distributed_build.RayBuildStats), when one built it

    @property
    def items_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def reject(self, r: Rejected) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REPORTED:
            self.rejections.append(r.to_dict())

    def to_dict(self) -> dict:
        return {"corpus": self.corpus, "read": self.read, "indexed": self.indexed, "rejected": self.rejected,
                "rejections": self.rejections, "resumed_at": self.resumed_at, "seconds": round(self.seconds, 3),
                "items_per_s": round(self.items_per_s, 2), "already_complete": self.already_complete,
                **({"ray": self.ray} if self.ray else {})}


def numbered(records: Iterable[Item | Rejected], start: int) -> Iterator[tuple[int, Item | Rejected]]:
    for i, r in enumerate(records):
        if i >= start:
            yield i, r


def chunks(it: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def accept(rows: list[tuple[int, Item | Rejected, str | None]], report: BuildReport, seen: set[str],
           journal: BuildJournal | None, strict: bool) -> list[int]:
    """Which rows of one batch are indexed: rows are (ordinal, record, why it cannot be
    embedded or None), in corpus order; the others are counted as rejected in `report`.
    An id seen earlier in this run, or already stored by an earlier run, is a duplicate: the
    first record with an id wins, as the cursor never repeats one. With a journal every earlier
    batch is committed, so the store finds their ids and `seen` need only hold this batch's (a
    set of every id would be a gigabyte at 10M); without one (`umr index add`), `seen` holds the run's."""
    if journal is not None:
        seen = set()
    kept = []
    for i, (_, rec, problem) in enumerate(rows):
        report.read += 1
        if isinstance(rec, Rejected):
            bad = rec
        elif problem is not None:
            bad = Rejected(rec.id, problem)
        elif rec.id in seen:
            bad = Rejected(rec.id, "duplicate id in the corpus")
        else:
            bad = None
            seen.add(rec.id)
            kept.append(i)
        if bad is not None:
            if strict:
                raise StrictError(f"bad record {bad.id}: {bad.reason}")
            report.reject(bad)
    stored = journal.stored_ids([rows[i][1].id for i in kept]) if journal and kept else set()
    for i in kept:
        if rows[i][1].id in stored:
            if strict:
                raise StrictError(f"bad record {rows[i][1].id}: duplicate id in the corpus")
            report.reject(Rejected(rows[i][1].id, "duplicate id in the corpus"))
    return [i for i in kept if rows[i][1].id not in stored]


def commit(store: IndexStore, items: list[Item] | PlainDocs, vectors, report: BuildReport, journal: BuildJournal | None,
           next_ordinal: int) -> None:
    """Store one batch's documents and vectors with the corpus cursor in one transaction."""
    docs = items if isinstance(items, PlainDocs) else [
        it if isinstance(it, DocRecord) else  # an import's plain id, stored as it is
        DocRecord(it.id, it.modality, it.text, it.image_ref(), it.metadata,
                  checked_metadata=getattr(it, "checked_metadata", None)) for it in items]
    report.indexed += len(docs)  # counted before the commit so the saved report includes this batch
    meta = journal.batch_meta(next_ordinal, report.to_dict()) if journal else None
    if docs or meta:
        # A journaled build's accept has looked every id up already.
        store.add(docs, vectors if vectors is not None else [], meta=meta, fresh=journal is not None)


def problem_of(prepared) -> str | None:
    """Why an item could not be prepared, as a build reports it."""
    if not isinstance(prepared, Exception):
        return None
    return str(prepared) if isinstance(prepared, (BadImage, ValueError)) else f"{prepared.__class__.__name__}: {prepared}"


