"""The indexing pipeline: corpus -> prepared items (worker processes or threads) -> encoder forward -> index.

Resumable: every batch is committed to the document store in one transaction together with
the corpus cursor, so a build killed at any point (SIGKILL included) continues from its last
committed batch when the same command is run again, and ends with every item exactly once.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

from umr.index import layout
from umr.index.build_journal import BuildJournal
from umr.index.errors import IndexMismatch, InvalidArgument
from umr.index.store import IndexStore
from umr.retrieval.indexing.build_steps import BuildReport, accept, chunks, commit, numbered, problem_of
from umr.retrieval.device import default_batch_size, default_workers
from umr.retrieval.encoders.base import Encoder
from umr.retrieval.items import Item
from umr.retrieval.encoders import prepare_processes
from umr.retrieval.encoders.prefetch import prefetch_batches
from umr.retrieval.progress import bar as progress_bar
from umr.retrieval.corpus.readers import Rejected, open_corpus

log = logging.getLogger("umr.retrieval")

def ingest(store: IndexStore, encoder: Encoder, records: Iterable[Item | Rejected], report: BuildReport, *,
           start: int = 0, batch_size: int | None = None, workers: int | None = None, strict: bool = False,
           progress=None, journal: BuildJournal | None = None, worker_kind: str = "auto") -> BuildReport:
    """Encode and store records from ordinal `start` on; bad records are counted, not fatal.
    `batch_size` and `workers` default to the device's (retrieval/device.py)."""
    seen: set[str] = set()
    batch_size = batch_size or default_batch_size()
    t0 = time.perf_counter()
    for chunk, prepared in prepared_chunks(encoder, chunks(numbered(records, start), batch_size), batch_size,
                                           workers, worker_kind):
        rows = [(ordinal, rec, None if isinstance(rec, Rejected) else problem_of(prep))
                for (ordinal, rec), prep in zip(chunk, prepared)]
        kept = accept(rows, report, seen, journal, strict)
        vectors = encoder.embed([prepared[i] for i in kept]) if kept else None
        commit(store, [chunk[i][1] for i in kept], vectors, report, journal, chunk[-1][0] + 1)
        if progress is not None:
            progress.update(len(chunk))
    report.seconds += time.perf_counter() - t0
    return report


WORKER_KINDS = ("auto", "processes", "threads")


def prepared_chunks(encoder: Encoder, numbered_chunks: Iterable[list[tuple[int, Item | Rejected]]], batch_size: int,
                    workers: int | None = None, worker_kind: str = "auto"):
    """(chunk, each record's Prepared or the exception it raised) for chunks of (ordinal,
    record), prepared ahead of the forward pass in `workers` processes or threads
    (retrieval/encoders/prepare_processes.py says why processes, where the platform forks)."""
    workers = workers or default_workers()

    def prepare(entry):
        _, rec = entry
        if isinstance(rec, Rejected):
            return rec
        return encoder.prepare(rec, "document")

    preparer = _process_preparer(encoder, worker_kind)
    if preparer is None:
        return prefetch_batches(numbered_chunks, prepare, workers)
    return prepare_processes.prefetch_in_processes(numbered_chunks, prepare, lambda entry: entry[1], preparer,
                                                   workers, rows=batch_size)


def _process_preparer(encoder: Encoder, worker_kind: str):
    """The preparer the worker processes run, or None for threads."""
    if worker_kind not in WORKER_KINDS:
        raise InvalidArgument(f"unknown worker kind {worker_kind!r}: use {', '.join(WORKER_KINDS)}")
    if worker_kind == "threads" or not encoder.supports_images:
        return None
    preparer = encoder.preparer() if prepare_processes.available() else None
    if preparer is None and worker_kind == "processes":
        why = ("this platform cannot fork" if not prepare_processes.available()
               else f"encoder {encoder.spec} needs its model to prepare images")
        raise InvalidArgument(f"--worker-kind processes: {why}; use --worker-kind threads (or auto)")
    return preparer


def build_index(corpus: str | Path, encoder: Encoder, out: str | Path, *, index_kind: str = "auto",
                memory_budget: int | None = None, batch_size: int | None = None, workers: int | None = None, strict: bool = False,
                corpus_format: str = "auto", progress: bool = True, ray: str | None = None,
                shard_size: int = 4096, vector_dtype: str = "float32", target_recall: float | None = None,
                worker_kind: str = "auto") -> BuildReport:
    """Build (or resume building) the index at `out`. `ray`: encode on that Ray cluster ("auto"
    or a head node's address) in shards of `shard_size` records (retrieval/indexing/distributed_build.py).
    `vector_dtype`: how the exact vectors are kept (float16: half the disk; index/vector_file.py);
    `target_recall`: search parameters tuned for it at the end (index/recall_tuning.py).
    `worker_kind`: where images are prepared, processes or threads ("auto": processes where
    the platform forks and the encoder prepares without its model)."""
    corpus = Path(corpus)
    _process_preparer(encoder, worker_kind)  # refused before anything is written
    batch_size = batch_size or default_batch_size()
    reader = open_corpus(corpus, corpus_format)
    if ray and encoder.numerics():  # workers would embed at their own process's settings
        raise InvalidArgument(f"{_numerics_words(encoder.numerics())} applies to this process only, not to "
                              "Ray workers: build with --ray at the defaults, or without --ray")
    if ray:  # before anything is written: a cluster that cannot be reached leaves no half-made index
        from umr.retrieval.indexing.distributed_build import connect

        connect(ray)

    def run(store, journal, report, start, bar):
        if ray:
            from umr.retrieval.indexing.distributed_build import ray_ingest

            t0 = time.perf_counter()
            report.ray = ray_ingest(store, encoder, reader, report, start=start, address=ray, shard_size=shard_size,
                                    batch_size=batch_size, strict=strict, journal=journal, progress=bar).to_dict()
            report.seconds += time.perf_counter() - t0
        else:
            ingest(store, encoder, reader, report, start=start, batch_size=batch_size, workers=workers,
                   strict=strict, progress=bar, journal=journal, worker_kind=worker_kind)

    report = run_build(out, encoder, {"corpus": str(corpus.resolve()), "format": reader.kind}, str(corpus),
                       _length(reader), run, index_kind=index_kind, memory_budget=memory_budget,
                       batch_size=batch_size, progress=progress, vector_dtype=vector_dtype,
                       target_recall=target_recall)
    if ray:
        from umr.retrieval.indexing.distributed_build import remove_shards

        remove_shards(Path(out))
    return report


def _length(reader) -> int | None:
    try:
        return len(reader)
    except (OSError, TypeError):
        return None


def run_build(out: str | Path, encoder: Encoder, source: dict, label: str, total: int | None, run, *,
              index_kind: str, memory_budget: int | None, batch_size: int, progress: bool,
              vector_dtype: str = "float32", target_recall: float | None = None) -> BuildReport:
    """What every kind of build shares: create the index or resume it (checking that the same
    build is resumed), `run(store, journal, report, start, bar)` from the cursor, then train and
    fill FAISS, record the report and save. `source` identifies what is being indexed."""
    out = Path(out)
    if (out / layout.MANIFEST).exists():
        store = IndexStore.open(out)
        journal = BuildJournal(store)
        prev = journal.source
        if store.encoder["fingerprint"] != encoder.fingerprint:
            store.close()
            raise IndexMismatch(
                f"{out} was started with encoder {store.encoder['spec']} (fingerprint {store.encoder['fingerprint']}), "
                f"not {encoder.spec} ({encoder.fingerprint}); re-run with --encoder {store.encoder['spec']} or choose a new --out"
            )
        built_as = store.encoder.get("vectors_fingerprint", store.encoder["fingerprint"])
        if built_as != encoder.vectors_fingerprint:
            was, now = store.encoder.get("numerics") or {}, encoder.numerics()
            store.close()
            raise IndexMismatch(
                f"{out} was started with {_numerics_words(was)}, this run has {_numerics_words(now)}: the vectors "
                "would differ in their last digits; resume it with the same --precision and --image-decode, "
                "or choose a new --out")
        if prev and prev != source:
            store.close()
            raise IndexMismatch(f"{out} is being built from {prev.get('corpus') or prev}; to add another corpus use "
                                "`umr index add`, or choose a new --out")
        asked = {"kind": index_kind, "memory_budget": memory_budget, "vector_dtype": vector_dtype,
                 "target_recall": target_recall}
        if journal.index_request != asked and not store.ready:
            req = journal.index_request
            store.close()
            raise IndexMismatch(
                f"{out} was started with --index {req['kind']}, memory budget {req['memory_budget']}, "
                f"--vector-dtype {req['vector_dtype']} and target recall {req['target_recall']}; "
                "resume it with the same flags, or choose a new --out"
            )
        if store.ready:
            report = BuildReport(label, already_complete=True, **{
                k: v for k, v in journal.record.get("report", {}).items()
                if k in ("read", "indexed", "rejected", "rejections")})
            store.close()
            return report
    else:
        store = IndexStore.create(out, encoder.record(), index_kind, memory_budget, vector_dtype, target_recall)
        journal = BuildJournal(store)
        journal.begin(source, batch_size)
    try:
        start, saved = journal.position()
        report = BuildReport(label, resumed_at=start)
        log.info("building %s from %s (%s) with %s%s", out, label, source.get("format"), encoder.spec,
                 f", resuming after item {start}" if start else "")
        if saved:
            for k in ("read", "indexed", "rejected", "rejections"):
                setattr(report, k, saved[k])
        bar = progress_bar(total, "indexing", progress, initial=start)
        try:
            run(store, journal, report, start, bar)
        finally:
            if bar is not None:
                bar.close()
        if store.count() == 0:
            raise InvalidArgument(f"no valid items in {label} ({report.rejected} rejected); nothing to index")
        t0 = time.perf_counter()
        store.finalize()
        journal.finish(report.to_dict(), time.perf_counter() - t0)
        store.record_event("built", documents=store.count(), rejected=report.rejected)
        store.save()
        log.info("built %s: %d indexed, %d rejected", out, report.indexed, report.rejected)
    finally:
        store.close()
    return report


def _numerics_words(n: dict) -> str:
    return f"--precision {n.get('precision', 'float32')} --image-decode {n.get('image_decode', 'cpu')}"


def add_to_index(store: IndexStore, encoder: Encoder, corpus: str | Path, *, batch_size: int | None = None,
                 workers: int | None = None, strict: bool = False, corpus_format: str = "auto", progress: bool = True,
                 worker_kind: str = "auto") -> BuildReport:
    """Add a corpus to a finished index without rebuilding it; same ids replace old documents."""
    _process_preparer(encoder, worker_kind)
    reader = open_corpus(corpus, corpus_format)
    report = BuildReport(str(corpus))
    bar = progress_bar(None, "adding", progress)
    try:
        ingest(store, encoder, reader, report, batch_size=batch_size, workers=workers, strict=strict, progress=bar,
               worker_kind=worker_kind)
    finally:
        if bar is not None:
            bar.close()
    store.record_event("added", corpus=str(Path(corpus).resolve()), indexed=report.indexed, rejected=report.rejected)
    store.save()
    return report
