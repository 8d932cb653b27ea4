"""The index directory (its files: index/layout.py): segments of FAISS vectors, the document
store and the manifest.

Adds are durable when their SQLite transaction commits. FAISS files are checkpoints written
atomically by `save()`; on open, any rows newer than a checkpoint are replayed into FAISS, so
a crash between a commit and a save loses nothing and a crash during a save leaves the
previous checkpoint readable.

This class keeps the segments' life cycle (create, open, add, delete, finish, activate,
checkpoint, compact); a segment's loading, search, calibration and a reader's catch-up live in
their own modules, named where they are used.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from umr.index import integrity, recall_tuning, registry, vector_file
from umr.index import index_kinds
from umr.index import vector_index as vi
from umr.index import layout, store_info
from umr.index.calibration_cache import CalibrationCache
from umr.index.compaction import compact_segments
from umr.index.documents import check_batch
from umr.index.documents import DocRecord, PlainDocs, modality_codes
from umr.index.docstore import DocStore
from umr.index.errors import IndexError_, IndexMismatch, InvalidArgument, NotFound
from umr.index.follow import Followed, ReaderPosition
from umr.index.locks import WriterLock, manifest_lock
from umr.index.manifest import new_manifest, now, read_manifest, same_manifest, write_manifest
from umr.index.search_merge import run_plan
from umr.index.search_plan import SearchHit, SearchPlan
from umr.index.segment import Segment
from umr.index import segment_loading

log = logging.getLogger("umr.index")



class IndexStore:
    """Open with `IndexStore.open(dir)` or `IndexStore.create(dir, encoder_record, ...)`."""

    def __init__(self, path: Path, manifest: dict, docs: DocStore, mode: str = "write", writer: WriterLock | None = None):
        self.path = path
        self.manifest = manifest
        self.docs = docs
        self.mode = mode
        self._writer = writer
        self.lock = threading.RLock()
        self._checkpoint_lock = threading.Lock()
        self.segments: list[Segment] = []
        self.calibrations = CalibrationCache(docs, self.lock)
        self.repairs: list[str] = []  # what opening found damaged and rebuilt (also logged)
        self.rows_since_checkpoint = 0
        self.dirty_since: float | None = None  # monotonic time of the first add after the last checkpoint
        self._stale_files: list[str] = []  # checkpoints to delete once the manifest no longer names them
        self._position = ReaderPosition(0, None)  # what a reader has applied of the writer's commits (follow())

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, encoder: dict, index_kind: str = "auto", memory_budget: int | None = None,
               vector_dtype: str = vector_file.DEFAULT_DTYPE, target_recall: float | None = None) -> "IndexStore":
        """`vector_dtype`: float32, or float16 for half the disk (index/vector_file.py);
        `target_recall`: search parameters tuned for it when the build finishes (index/recall_tuning.py)."""
        path = Path(path)
        if (path / layout.MANIFEST).exists():
            raise IndexError_(f"{path} already holds an index; open it, or choose another --out")
        index_kinds.check_requested(index_kind)
        vector_file.check_dtype(vector_dtype)
        recall_tuning.check_target(target_recall)
        path.mkdir(parents=True, exist_ok=True)
        writer = WriterLock(path).acquire()
        try:
            manifest = new_manifest(encoder, {"kind": index_kind, "memory_budget": memory_budget,
                                              "vector_dtype": vector_dtype, "target_recall": target_recall})
            docs = integrity.new_docstore(path / layout.DOCSTORE, manifest, vector_dtype)
            write_manifest(path, manifest)
        except BaseException:
            writer.release()
            raise
        store = cls(path, manifest, docs, "write", writer)
        store.segments = [Segment(manifest["segments"][0])]
        return store

    @classmethod
    def open(cls, path: str | Path, mode: str = "write", repair: bool = False, check: bool = True,
             checked_file: tuple[int, int] | None = None) -> "IndexStore":
        """`mode` "write" takes the index's write lock (one writing process at a time);
        "read" takes none and refuses every write. `repair` accepts the document store as the
        truth where FAISS checkpoints disagree with it, or where it lost writes it acknowledged
        (`umr index verify --repair`). `check` runs SQLite's integrity check on a document store
        of up to integrity.OPEN_CHECK_MAX_BYTES and refuses a damaged one (`umr index verify`
        opens without it, to list what it finds), except on the file `checked_file` names, which
        this process checked already (integrity.open_docstore)."""
        if mode not in ("write", "read"):
            raise InvalidArgument(f"mode must be 'write' or 'read', got {mode!r}")
        path = Path(path)
        manifest = read_manifest(path)
        writer = WriterLock(path).acquire() if mode == "write" else None
        try:
            accepted: list[str] = []
            docs = integrity.open_docstore(path / layout.DOCSTORE, manifest, read_only=mode == "read", check=check,
                                           accept_loss=accepted.append if repair else None, checked_file=checked_file)
            store = cls(path, manifest, docs, mode, writer)
            for message in accepted:
                store._repaired(message)
            # Before the rows are read: a death committed meanwhile is applied again, never missed.
            store._position = ReaderPosition.at_open(path, docs)
            for rec in manifest["segments"]:
                store.segments.append(segment_loading.load_segment(path, docs, rec, mode == "read", repair,
                                                                   store._repaired))
            if mode == "write":  # files of checkpoints a crash wrote but never recorded
                integrity.remove_checkpoints(path, integrity.unrecorded_checkpoints(path, manifest))
            log.info("opened %s for %s: %d documents in %d segment(s)", path, "writing" if mode == "write" else "reading",
                     store.count(), len(store.segments))
            return store
        except BaseException:
            if writer is not None:
                writer.release()
            raise

    def follow(self) -> Followed:
        """A reader's catch-up with the writer (index/follow.py): rows committed since the last
        call join their segments, deletions become tombstones; a change of shape is not applied,
        the result says to reopen. Costs one SQLite pragma when nothing was committed."""
        if self.mode != "read":
            raise InvalidArgument("follow() is for an index opened read-only; the writer has every change already")
        return self._position.catch_up(self.path, self.manifest, self.segments, self.docs, self.lock)

    def _repaired(self, message: str) -> None:
        self.repairs.append(message)
        log.warning("%s: %s", self.path, message)

    def require_write(self, what: str) -> None:
        if self.mode != "write":
            raise IndexError_(f"{self.path} is open read-only here; cannot {what}")

    def close(self) -> None:
        self.docs.close()
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    # -- properties -----------------------------------------------------------------------
    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    @property
    def ready(self) -> bool:
        return self.manifest["state"] == "ready"

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def versions(self) -> list[dict]:
        return self.manifest["encoders"]

    @property
    def active_version(self) -> int:
        return int(self.manifest["active_version"])

    def version(self, v: int) -> dict:
        return registry.version(self.manifest, v, self.path)

    def version_of_fingerprint(self, fingerprint: str) -> int | None:
        return registry.version_of_fingerprint(self.manifest, fingerprint)

    def count(self) -> int:
        return int(sum(s.alive.sum() for s in self.segments))

    # -- writes ---------------------------------------------------------------------------
    def add(self, docs: list[DocRecord] | PlainDocs, vectors: np.ndarray, meta: dict[str, str] | None = None,
            fresh: bool = False) -> int:
        """Store docs in the active segment; durable on return. Same id replaces the old doc;
        `fresh`: the caller knows no id is stored yet (index/docstore.py DocStore.add)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(docs) != len(vectors):
            raise InvalidArgument(f"{len(docs)} documents but {len(vectors)} vectors")
        check_batch(docs)
        self.require_write("add documents")
        with self.lock:
            seg = self.active
            if len(docs) and vectors.shape[1] != seg.dim:
                raise IndexMismatch(f"vectors have dimension {vectors.shape[1]}, the index expects {seg.dim}")
            first = len(seg.alive)
            stored = self.docs.vectors.as_stored(vectors)
            vectors = stored.astype(np.float32, copy=False)  # FAISS holds what the store reads back
            codes = modality_codes(docs)
            replaced = self.docs.add(seg.id, first, docs, stored, meta, fresh, codes)
            seg.grow(first + len(docs))
            seg.alive[first:] = True
            seg.codes[first:] = codes
            for s_id, row in replaced:
                self._segment(s_id).alive[row] = False
            if seg.faiss is not None and len(docs):
                seg.append(vectors)
                seg.dirty = True
            self.rows_since_checkpoint += len(docs)
            if self.dirty_since is None and len(docs):
                self.dirty_since = time.monotonic()
        return len(docs)

    def delete(self, ids: list[str]) -> list[str]:
        self.require_write("delete documents")
        with self.lock:
            gone = self.docs.delete(ids)
            for _, s_id, row in gone:
                self._segment(s_id).alive[row] = False
        return [g[0] for g in gone]

    def finalize(self) -> None:
        """Choose, train and fill the FAISS index of every segment still without one."""
        self.require_write("finish the build")
        with self.lock:
            req = self.manifest["index_request"]
            built = []
            for seg in self.segments:
                if seg.faiss is not None:
                    continue
                built.append(seg)
                n = len(seg.alive)
                choice = vi.choose_trainable(req["kind"], n, seg.dim, req.get("memory_budget"))
                seg.record["index"] = choice.to_dict()
                seg.record["faiss_file"] = layout.first_checkpoint(seg.id)
                log.info("segment %d: %s index over %d vectors (%s)", seg.id, choice.kind, n, choice.reason,
                         extra={"segment": seg.id})
                segment_loading.rebuild(seg, self.docs)
            target = req.get("target_recall")
            for seg in built if target else []:
                tuning = recall_tuning.tune_segment(self, seg, target)
                log.info("segment %d: %s for recall@%d %.3f (target %.3f), %.2f ms a query", seg.id, tuning.params,
                         tuning.k, tuning.recall, target, tuning.ms_per_query, extra={"segment": seg.id})
            for seg in self.segments:
                self.calibrations.of(seg)  # fitted at build time and kept in the manifest
            self.manifest["state"] = "ready"
            self.save()

    def register_version(self, encoder: dict) -> int:
        """Record a new encoder version (not yet active); returns its number."""
        with self.lock:
            return registry.register(self.manifest, encoder)

    def set_compensator(self, seg_id: int, from_version: int, modality: str, record: dict) -> None:
        registry.set_compensator(self._segment(seg_id).record, from_version, modality, record)

    def set_reference(self, version: int, record: dict) -> None:
        """Name the reference queries of `version` (retrieval/update/reference_queries.py)."""
        with self.lock:
            registry.set_reference(self.manifest, version, record, self.path)

    def activate(self, version: int) -> Segment:
        """Make `version` the query encoder and give it a segment for new documents.

        Older segments are never re-embedded; they are reached through their compensators.
        """
        self.require_write("activate an encoder version")
        with self.lock:
            rec = self.version(version)
            self.manifest["active_version"] = version
            if self.active.record["encoder"].get("version", 1) != version:
                seg = Segment.for_version(max(s.id for s in self.segments) + 1, rec, self.segments[0].choice)
                self.manifest["segments"].append(seg.record)
                self.segments.append(seg)
            self.record_event("activated", version=version, fingerprint=rec["fingerprint"])
            self.save()
            return self.active

    def rebuild(self, seg: Segment, why: str) -> None:
        """Rebuild a segment's FAISS index from the document store, recorded as a repair."""
        self.require_write("rebuild FAISS")
        with self.lock:
            self._repaired(f"{why}; rebuilt its FAISS index from the document store ({len(seg.alive)} rows)")
            segment_loading.rebuild(seg, self.docs)

    def refresh_registrations(self) -> dict | None:
        """Merge encoder versions and compensators that another process (`umr update
        --no-activate` beside a running server) registered on disk, so that neither this
        process's next save nor its activation loses them."""
        with self.lock:
            try:
                disk = read_manifest(self.path)
            except IndexError_:
                return None
            registry.merge(self.manifest, disk, prefer_source=False)
            return disk

    def save(self) -> None:
        """Checkpoint dirty FAISS indexes, then the manifest, each atomically, each FAISS file
        with the checksum and row count it is checked against on open.

        FAISS files are written outside the store lock, so searches go on meanwhile; callers
        keep adds out (the engine holds its write lock, a build is one thread). Should one slip
        in, the file holds more rows than recorded, and the next open rebuilds it."""
        self.require_write("save")
        with self._checkpoint_lock:
            with self.lock:
                todo = [(seg, int(seg.faiss.ntotal)) for seg in self.segments if seg.faiss is not None and seg.dirty]
                for seg, _ in todo:
                    seg.dirty = False
                pending_rows, self.rows_since_checkpoint, self.dirty_since = self.rows_since_checkpoint, 0, None
            written = {}
            try:
                for seg, rows in todo:
                    written[seg.id] = integrity.write_checkpoint(self.path, seg.id, seg.faiss, rows, self.docs.epoch(seg.id))
                    log.info("segment %d: checkpoint of %d rows written to %s", seg.id, rows, written[seg.id][0],
                             extra={"segment": seg.id})
            except BaseException:
                with self.lock:
                    for seg, _ in todo:
                        seg.dirty = seg.dirty or seg.id not in written
                    self.rows_since_checkpoint += pending_rows
                raise
            replaced = []
            with self.lock, manifest_lock(self.path):
                on_disk = self.refresh_registrations()
                for seg in self.segments:
                    if seg.id in written:
                        name, record = written[seg.id]
                        replaced.append(seg.record.get("faiss_file"))
                        seg.record["faiss_file"] = name
                        seg.record[integrity.CHECKPOINT] = record
                        seg.record["rows_checkpointed"] = record["rows"]
                    seg.record["count"] = int(seg.alive.sum())
                if written or not same_manifest(on_disk, self.manifest):  # nothing changed: write nothing
                    write_manifest(self.path, self.manifest)
            stale, self._stale_files = [*replaced, *self._stale_files], []
            integrity.remove_checkpoints(self.path, [r for r in stale if r])
            # And the WAL into docs.sqlite: what only the WAL holds is lost with it.
            self.docs.checkpoint_wal()

    def save_registrations(self) -> None:
        """Write only what `umr update --no-activate` adds (encoder versions, compensators,
        history) into the manifest on disk, merged under the manifest lock: allowed read-only,
        beside a running server, whose own segment records stay as it wrote them."""
        with self.lock, manifest_lock(self.path):
            disk = read_manifest(self.path)
            registry.merge(disk, self.manifest, prefer_source=True, history=True)
            write_manifest(self.path, disk)

    def compact(self) -> dict[int, int]:
        """Drop dead rows and their tombstones (index/compaction.py); rows dropped per segment."""
        self.require_write("compact")
        with self.lock:
            dropped, replaced = compact_segments(self.path, self.docs, self.segments)
            self._stale_files += replaced
            self.record_event("compacted", rows=dropped)
        self.save()
        if dropped:
            self.docs.vacuum()
        log.info("compacted %s: dropped %d dead rows", self.path, sum(dropped.values()))
        return dropped

    def record_event(self, event: str, **details) -> None:
        with self.lock:
            self.manifest["history"].append({"time": now(), "event": event, **details})

    # -- reads ----------------------------------------------------------------------------
    def get(self, doc_id: str) -> DocRecord:
        found = self.docs.get(doc_id)
        if found is None:
            raise NotFound(f"no document with id {doc_id!r}")
        return found[0]

    def _segment(self, seg_id: int) -> Segment:
        for s in self.segments:
            if s.id == seg_id:
                return s
        raise IndexError_(f"no segment {seg_id}")

    # -- search -------------------------------------------------------------------------
    def search(self, plan: SearchPlan) -> list[list[SearchHit]]:
        """The plan's top-k per query, merged over segments by score (index/search_merge.py)."""
        if not self.ready:
            raise IndexError_(f"the index at {self.path} is not finished; re-run its `umr index build` command to complete it")
        plan.check()
        with self.lock:
            return run_plan(plan, self.segments, self.docs, self.calibrations)

    def info(self) -> dict:
        return store_info.describe(self)
