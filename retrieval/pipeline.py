"""The indexing pipeline: corpus -> prepared items (worker threads) -> encoder forward -> index.

Resumable: every batch is committed to the document store in one transaction together with
the corpus cursor, so a build killed at any point (SIGKILL included) continues from its last
committed batch when the same command is run again, and ends with every item exactly once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from index.build_journal import BuildJournal
from index.docstore import DocRecord
from index.errors import IndexMismatch, InvalidArgument
from index.store import IndexStore
from retrieval.encoders.base import Encoder
from retrieval.images import BadImage
from retrieval.items import Item
from retrieval.prefetch import prefetch_batches
from retrieval.progress import bar as progress_bar
from retrieval.readers import Rejected, open_corpus

log = logging.getLogger("umr.retrieval")

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
                "items_per_s": round(self.items_per_s, 2), "already_complete": self.already_complete}


def _numbered(records: Iterable[Item | Rejected], start: int) -> Iterator[tuple[int, Item | Rejected]]:
    for i, r in enumerate(records):
        if i >= start:
            yield i, r


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ingest(store: IndexStore, encoder: Encoder, records: Iterable[Item | Rejected], report: BuildReport, *,
           start: int = 0, batch_size: int = 64, workers: int = 2, strict: bool = False,
           progress=None, journal: BuildJournal | None = None) -> BuildReport:
    """Encode and store records from ordinal `start` on; bad records are counted, not fatal."""
    seen: set[str] = set()

    def prepare(entry):
        _, rec = entry
        if isinstance(rec, Rejected):
            return rec
        return encoder.prepare(rec, "document")

    t0 = time.perf_counter()
    for chunk, prepared in prefetch_batches(_chunks(_numbered(records, start), batch_size), prepare, workers):
        good_items, good_prep = [], []
        for (ordinal, rec), prep in zip(chunk, prepared):
            report.read += 1
            if isinstance(rec, Rejected):
                bad = rec
            elif isinstance(prep, Exception):
                reason = str(prep) if isinstance(prep, (BadImage, ValueError)) else f"{prep.__class__.__name__}: {prep}"
                bad = Rejected(rec.id, reason)
            elif rec.id in seen:
                bad = Rejected(rec.id, "duplicate id in the corpus")
            else:
                bad = None
                seen.add(rec.id)
                good_items.append(rec)
                good_prep.append(prep)
            if bad is not None:
                if strict:
                    raise StrictError(f"bad record {bad.id}: {bad.reason}")
                report.reject(bad)
        if good_items:
            # An id already stored came from an earlier record (the cursor never repeats one).
            dupes = journal.stored_ids([it.id for it in good_items]) if journal else set()
            if dupes:
                keep = [i for i, it in enumerate(good_items) if it.id not in dupes]
                for it in good_items:
                    if it.id in dupes:
                        if strict:
                            raise StrictError(f"bad record {it.id}: duplicate id in the corpus")
                        report.reject(Rejected(it.id, "duplicate id in the corpus"))
                good_items = [good_items[i] for i in keep]
                good_prep = [good_prep[i] for i in keep]
        vectors = encoder.embed(good_prep) if good_prep else None
        docs = [DocRecord(it.id, it.modality, it.text, it.image_ref(), it.metadata) for it in good_items]
        report.indexed += len(docs)  # counted before the commit so the saved report includes this batch
        meta = None
        if journal:
            meta = journal.batch_meta(chunk[-1][0] + 1, report.to_dict())
        if docs or meta:
            store.add(docs, vectors if vectors is not None else [], meta=meta)
        if progress is not None:
            progress.update(len(chunk))
    report.seconds += time.perf_counter() - t0
    return report


def build_index(corpus: str | Path, encoder: Encoder, out: str | Path, *, index_kind: str = "auto",
                memory_budget: int | None = None, batch_size: int = 64, workers: int = 2, strict: bool = False,
                corpus_format: str = "auto", progress: bool = True) -> BuildReport:
    corpus = Path(corpus)
    reader = open_corpus(corpus, corpus_format)
    out = Path(out)
    source = {"corpus": str(corpus.resolve()), "format": reader.kind}
    if (out / "manifest.json").exists():
        store = IndexStore.open(out)
        journal = BuildJournal(store)
        prev = journal.source
        if store.encoder["fingerprint"] != encoder.fingerprint:
            raise IndexMismatch(
                f"{out} was started with encoder {store.encoder['spec']} (fingerprint {store.encoder['fingerprint']}), "
                f"not {encoder.spec} ({encoder.fingerprint}); re-run with --encoder {store.encoder['spec']} or choose a new --out"
            )
        if prev and prev["corpus"] != source["corpus"]:
            raise IndexMismatch(f"{out} is being built from {prev['corpus']}; to add another corpus use `umr index add`")
        asked = {"kind": index_kind, "memory_budget": memory_budget}
        if journal.index_request != asked and not store.ready:
            req = journal.index_request
            raise IndexMismatch(
                f"{out} was started with --index {req['kind']} and memory budget {req['memory_budget']}; "
                "resume it with the same flags, or choose a new --out"
            )
        if store.ready:
            report = BuildReport(str(corpus), already_complete=True, **{
                k: v for k, v in journal.record.get("report", {}).items()
                if k in ("read", "indexed", "rejected", "rejections")})
            store.close()
            return report
    else:
        store = IndexStore.create(out, encoder.record(), index_kind, memory_budget)
        journal = BuildJournal(store)
        journal.begin(source, batch_size)
    try:
        start, saved = journal.position()
        report = BuildReport(str(corpus), resumed_at=start)
        log.info("building %s from %s (%s) with %s%s", out, corpus, reader.kind, encoder.spec,
                 f", resuming after item {start}" if start else "")
        if saved:
            for k in ("read", "indexed", "rejected", "rejections"):
                setattr(report, k, saved[k])
        total = None
        try:
            total = len(reader)
        except (OSError, TypeError):
            pass
        bar = progress_bar(total, "indexing", progress, initial=start)
        try:
            ingest(store, encoder, reader, report, start=start, batch_size=batch_size, workers=workers,
                   strict=strict, progress=bar, journal=journal)
        finally:
            if bar is not None:
                bar.close()
        if store.count() == 0:
            raise InvalidArgument(f"no valid items in {corpus} ({report.rejected} rejected); nothing to index")
        t0 = time.perf_counter()
        store.finalize()
        journal.finish(report.to_dict(), time.perf_counter() - t0)
        store.record_event("built", documents=store.count(), rejected=report.rejected)
        store.save()
        log.info("built %s: %d indexed, %d rejected", out, report.indexed, report.rejected)
    finally:
        store.close()
    return report


def add_to_index(store: IndexStore, encoder: Encoder, corpus: str | Path, *, batch_size: int = 64,
                 workers: int = 2, strict: bool = False, corpus_format: str = "auto", progress: bool = True) -> BuildReport:
    """Add a corpus to a finished index without rebuilding it; same ids replace old documents."""
    reader = open_corpus(corpus, corpus_format)
    report = BuildReport(str(corpus))
    bar = progress_bar(None, "adding", progress)
    try:
        ingest(store, encoder, reader, report, batch_size=batch_size, workers=workers, strict=strict, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    store.record_event("added", corpus=str(Path(corpus).resolve()), indexed=report.indexed, rejected=report.rejected)
    store.save()
    return report
