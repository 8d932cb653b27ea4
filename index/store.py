"""The index directory: segments of FAISS vectors, the document store and the manifest.

Layout:
    manifest.json              what built it, index choice per segment, history
    docs.sqlite                documents, row states, tombstones, build cursor (WAL, fsync'd)
    segments/<id>/vectors.<epoch>.<f32|f16>  the segment's exact vectors (index/vector_file.py)
    segments/<id>/index.<token>.faiss  the checkpoint of a segment's FAISS index the manifest names

Adds are durable when their SQLite transaction commits. FAISS files are checkpoints written
atomically by `save()`; on open, any rows newer than a checkpoint are replayed into FAISS, so
a crash between a commit and a save loses nothing and a crash during a save leaves the
previous checkpoint readable.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from umr.index import modality_calibration as mc
from umr.index import version_scale
from umr.index import commit_mark, gpu, integrity, recall_tuning, registry, vector_file
from umr.index import index_kinds
from umr.index import vector_index as vi
from umr.index.atomic import atomic_write
from umr.index.docstore import CODE_MODALITIES, MODALITY_CODES, DocRecord, DocStore, validate_filter
from umr.index.errors import IndexError_, IndexMismatch, InvalidArgument, NotFound
from umr.index.locks import WriterLock, manifest_lock
from umr.index.manifest import new_manifest, now, read_manifest, write_manifest

log = logging.getLogger("umr.index")

DOCSTORE = "docs.sqlite"
# With this few candidates left after filtering, scoring them exactly beats a filtered ANN walk.
EXACT_FILTER_ROWS = 4096
# Threads that search the segments of one query batch side by side (1: one after the other),
# and the size from which an exact or IVF segment is worth a thread of its own.
SEGMENT_THREADS = max(1, min(8, os.cpu_count() or 1))
PARALLEL_MIN_ROWS = 20_000
# A follower reopens a memory-mapped segment once the writer has checkpointed it and this many
# rows wait in its exact-scan tail (a scan of 100k rows costs about what the IVF search does).
TAIL_REOPEN_ROWS = 100_000
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _segment_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=SEGMENT_THREADS, thread_name_prefix="umr-segment")
        return _POOL


@dataclass
class SearchHit:
    id: str
    score: float
    doc: DocRecord
    segment: int
    details: dict | None = None  # e.g. a re-ranker's cosine and P(yes) behind `score`
    cosine: float | None = None  # set when `score` is calibrated (across modalities or encoder versions): the raw cosine


@dataclass
class Followed:
    """What one IndexStore.follow() applied."""

    rows: int = 0
    deaths: int = 0
    reopen: str | None = None  # why this store must be reopened instead (the writer changed its shape)


class Segment:
    """One FAISS index over rows embedded by one encoder version.

    A reader maps an IVF-PQ checkpoint's lists from the file (read-only), so rows committed
    after that checkpoint cannot join them; they are kept as `tail`, exact vectors searched by
    a scan beside the index, rows faiss.ntotal.. in order."""

    def __init__(self, record: dict, faiss_index=None, alive=None, codes=None):
        self.record = record
        self.faiss = None
        self.alive = alive if alive is not None else np.zeros(0, dtype=bool)
        self.codes = codes if codes is not None else np.zeros(0, dtype=np.uint8)
        self.dirty = False
        self._tail = np.zeros((0, self.dim), dtype=np.float32)  # capacity grows by doubling
        self._tail_rows = 0
        self.mapped = False
        self.gpu = None  # a device copy of `faiss` (index/gpu.py)
        self.modality_counts: tuple | None = None  # IndexStore.modality_counts' cache
        if faiss_index is not None:
            self.set_index(faiss_index)

    def set_index(self, index) -> None:
        """Use `index` (loaded, built or compacted) and, on a GPU, a copy of it."""
        self.faiss, self.mapped = index, vi.is_mapped(index)
        choice = self.choice
        self.gpu = gpu.search_copy(index, choice.kind) if choice is not None else None

    @property
    def tail(self) -> np.ndarray:
        return self._tail[: self._tail_rows]

    @property
    def indexed_rows(self) -> int:
        """Rows searchable: in FAISS, and after a mapped checkpoint, in the tail."""
        return 0 if self.faiss is None else int(self.faiss.ntotal) + len(self.tail)

    def append(self, vectors: np.ndarray) -> None:
        """Make the next rows searchable (rows indexed_rows..)."""
        if self.mapped:  # a follower appends a few rows at a time: no copy of the whole tail each time
            need = self._tail_rows + len(vectors)
            if need > len(self._tail):
                grown = np.empty((max(need, 2 * len(self._tail), 1024), self.dim), dtype=np.float32)
                grown[: self._tail_rows] = self.tail
                self._tail = grown
            self._tail[self._tail_rows:need] = vectors
            self._tail_rows = need
        else:
            self.faiss.add(vectors)
            if self.gpu is not None:
                self.gpu.add(vectors)

    @property
    def id(self) -> int:
        return self.record["id"]

    @property
    def dim(self) -> int:
        return int(self.record["encoder"]["dim"])

    @property
    def choice(self) -> vi.IndexChoice | None:
        return vi.IndexChoice.from_dict(self.record["index"]) if self.record.get("index") else None

    def grow(self, n: int) -> None:
        if n > len(self.alive):
            extra = n - len(self.alive)
            self.alive = np.concatenate([self.alive, np.zeros(extra, dtype=bool)])
            self.codes = np.concatenate([self.codes, np.zeros(extra, dtype=np.uint8)])


def _stamp(path: Path) -> tuple | None:
    """When and how the manifest was last replaced (it is always replaced whole, atomically)."""
    try:
        st = (path / "manifest.json").stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def same_manifest(a: dict | None, b: dict) -> bool:
    """Equal as written to disk (JSON), its `updated` time aside."""
    def as_written(m: dict) -> str:
        return json.dumps({k: v for k, v in m.items() if k != "updated"}, sort_keys=True)
    return a is not None and as_written(a) == as_written(b)


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
        self._calibrations: dict[int, mc.ModalityCalibration] = {}
        self.repairs: list[str] = []  # what opening found damaged and rebuilt (also logged)
        self.rows_since_checkpoint = 0
        self.dirty_since: float | None = None  # monotonic time of the first add after the last checkpoint
        self._stale_files: list[str] = []  # checkpoints to delete once the manifest no longer names them
        # What a reader has applied of the writer's commits (follow()).
        self._data_version = -1
        self._death_seq = 0
        self._epochs: dict[int, int] = {}
        self._manifest_stamp: tuple | None = None

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, encoder: dict, index_kind: str = "auto", memory_budget: int | None = None,
               vector_dtype: str = vector_file.DEFAULT_DTYPE, target_recall: float | None = None) -> "IndexStore":
        """`vector_dtype`: float32, or float16 for half the disk (index/vector_file.py);
        `target_recall`: search parameters tuned for it when the build finishes (index/recall_tuning.py)."""
        path = Path(path)
        if (path / "manifest.json").exists():
            raise IndexError_(f"{path} already holds an index; open it, or choose another --out")
        if index_kind not in ("auto",) + index_kinds.names():
            raise InvalidArgument(f"unknown index type {index_kind!r}: use auto, {', '.join(index_kinds.names())}")
        vector_file.check_dtype(vector_dtype)
        recall_tuning.check_target(target_recall)
        path.mkdir(parents=True, exist_ok=True)
        writer = WriterLock(path).acquire()
        try:
            manifest = new_manifest(encoder, {"kind": index_kind, "memory_budget": memory_budget,
                                              "vector_dtype": vector_dtype, "target_recall": target_recall})
            docs = DocStore(str(path / DOCSTORE), vector_dtype=vector_dtype)
            docs.set_meta(integrity.DOCSTORE_ID, manifest[integrity.DOCSTORE_ID])
            docs.keep_mark(commit_mark.MarkWriter(path / DOCSTORE, manifest[integrity.DOCSTORE_ID]))
            write_manifest(path, manifest)
        except BaseException:
            writer.release()
            raise
        store = cls(path, manifest, docs, "write", writer)
        store.segments = [Segment(manifest["segments"][0])]
        return store

    @classmethod
    def open(cls, path: str | Path, mode: str = "write", repair: bool = False, check: bool = True) -> "IndexStore":
        """`mode` "write" takes the index's write lock (one writing process at a time);
        "read" takes none and refuses every write. `repair` accepts the document store as the
        truth where FAISS checkpoints disagree with it, or where it lost writes it acknowledged
        (`umr index verify --repair`). `check` runs SQLite's integrity check on a document store
        of up to integrity.OPEN_CHECK_MAX_BYTES and refuses a damaged one (`umr index verify`
        opens without it, to list what it finds)."""
        if mode not in ("write", "read"):
            raise InvalidArgument(f"mode must be 'write' or 'read', got {mode!r}")
        path = Path(path)
        manifest = read_manifest(path)
        writer = WriterLock(path).acquire() if mode == "write" else None
        try:
            accepted: list[str] = []
            docs = integrity.open_docstore(path / DOCSTORE, manifest, read_only=mode == "read", check=check,
                                           accept_loss=accepted.append if repair else None)
            store = cls(path, manifest, docs, mode, writer)
            for message in accepted:
                store._repaired(message)
            # Before the rows are read: a death committed meanwhile is applied again, never missed.
            store._death_seq, store._manifest_stamp = docs.last_death(), _stamp(path)
            for rec in manifest["segments"]:
                store.segments.append(store._load_segment(rec, repair))
            if mode == "write":  # files of checkpoints a crash wrote but never recorded
                integrity.remove_checkpoints(path, integrity.unrecorded_checkpoints(path, manifest))
            log.info("opened %s for %s: %d documents in %d segment(s)", path, "writing" if mode == "write" else "reading",
                     store.count(), len(store.segments))
            return store
        except BaseException:
            if writer is not None:
                writer.release()
            raise

    def _load_segment(self, rec: dict, repair: bool = False) -> Segment:
        n_rows = self.docs.row_count(rec["id"])
        alive, codes = self.docs.row_state(rec["id"], n_rows)
        seg = Segment(rec, None, alive, codes)
        on_disk = self.docs.vectors.missing(seg.id, n_rows)
        if rec.get("index") is None:
            if on_disk is not None:
                raise IndexError_(self._missing_vectors_message(seg, on_disk, n_rows))
            return seg  # still building: vectors are only in the docstore
        epoch = self._epochs[seg.id] = self.docs.epoch(seg.id)
        integrity.adopt_recorded_compaction(rec, self.docs.pending_checkpoint(seg.id), epoch)
        faiss_file = self.path / rec["faiss_file"] if rec.get("faiss_file") else None
        # A reader leaves IVF-PQ lists in the file: the index that outgrew memory still serves.
        mapped = self.mode == "read" and vi.IndexChoice.from_dict(rec["index"]).traits.maps_lists
        loaded, problem = integrity.load_checkpoint(faiss_file, rec, seg.dim, n_rows, epoch, mapped)
        if problem == integrity.DOCSTORE_OLDER and not repair:
            raise IndexError_(integrity.older_docstore_message(self.path, seg.id, n_rows, rec))
        if on_disk is not None:
            self._restore_vectors(seg, loaded, on_disk, n_rows, repair)
        if loaded is None:
            if problem:
                where = (" in memory only, the file left as it is (opened read-only; `umr index verify --repair` "
                         "rewrites it)") if self.mode == "read" else ""
                self._repaired(f"segment {seg.id}: {problem}; rebuilt its FAISS index from the document store "
                               f"({n_rows} rows){where}")
            self._build_faiss(seg)
        else:
            seg.set_index(loaded)
        if seg.indexed_rows < n_rows:  # replay rows committed after the last checkpoint
            log.info("segment %d: replaying %d rows committed after its last checkpoint", seg.id,
                     n_rows - seg.indexed_rows, extra={"segment": seg.id})
            for _, vecs in self.docs.iter_vectors(seg.id, start=seg.indexed_rows):
                seg.append(vecs)
            seg.dirty = True
        return seg

    def _restore_vectors(self, seg: Segment, loaded, on_disk: int, n_rows: int, repair: bool) -> None:
        """Rows missing from the segment's vector file, written back from a FAISS checkpoint that
        holds them exactly (with `repair`); otherwise refused, never served without them."""
        exact = loaded is not None and seg.choice.traits.holds_full_vectors and int(loaded.ntotal) >= n_rows
        if not (repair and exact):
            raise IndexError_(self._missing_vectors_message(seg, on_disk, n_rows, exact))
        rows = np.arange(on_disk, n_rows)
        for start in range(0, len(rows), 65536):
            part = rows[start:start + 65536]
            self.docs.put_vectors(seg.id, part, loaded.reconstruct_batch(part))
        self._repaired(f"segment {seg.id}: its vector file held {on_disk} of {n_rows} rows; restored the other "
                       f"{n_rows - on_disk} from the FAISS checkpoint, which holds them exactly")

    def _missing_vectors_message(self, seg: Segment, on_disk: int, n_rows: int, exact: bool = False) -> str:
        where = self.path / vector_file.file_name(seg.id, self.docs.epoch(seg.id), self.docs.vectors.dtype)
        fix = ("`umr index verify --repair` restores them from the segment's FAISS checkpoint, which holds them exactly"
               if exact else "restore the index from a backup, or delete those documents and add them again "
               "(no FAISS checkpoint of this segment holds them exactly)")
        return f"{where} holds {on_disk} of the {n_rows} vectors the document store committed (truncated or removed): {fix}"

    def follow(self) -> Followed:
        """A reader's catch-up with the writer: rows committed since the last call join their
        segments, rows deleted or replaced since become tombstones. A change of shape (another
        encoder version activated, a segment added or compacted, a build finished, a memory-mapped
        segment checkpointed with a long tail) is not applied; the result says to reopen.
        Costs one SQLite pragma when nothing was committed."""
        if self.mode != "read":
            raise InvalidArgument("follow() is for an index opened read-only; the writer has every change already")
        stamp = _stamp(self.path)
        if stamp != self._manifest_stamp:
            why = self._shape_change()
            if why:
                return Followed(reopen=why)
            self._manifest_stamp = stamp
        version = self.docs.data_version()
        if version == self._data_version:
            return Followed()
        with self.lock:
            for seg in self.segments:
                if self.docs.epoch(seg.id) != self._epochs.get(seg.id, 0):
                    return Followed(reopen=f"segment {seg.id} was compacted")
            counts = {seg.id: len(seg.alive) for seg in self.segments if seg.faiss is not None}
            changes = self.docs.changes_since(self._death_seq, counts)
            added = 0
            for seg_id, (vectors, codes, alive) in changes.rows.items():
                seg = self._segment(seg_id)
                first = len(seg.alive)
                seg.grow(first + len(vectors))
                seg.alive[first:], seg.codes[first:] = alive, codes
                seg.append(vectors)
                added += len(vectors)
            for seg_id, row in changes.deaths:
                seg = self._segment(seg_id)
                if row < len(seg.alive):
                    seg.alive[row] = False
            self._death_seq, self._data_version = changes.death_seq, version
        return Followed(rows=added, deaths=len(changes.deaths))

    def _shape_change(self) -> str | None:
        """Why the manifest on disk no longer matches this reader's segments, or None."""
        try:
            disk = read_manifest(self.path)
        except IndexError_:
            return None  # being replaced this instant: look again next time
        if disk.get("active_version") != self.manifest.get("active_version"):
            return f"encoder version {disk.get('active_version')} was activated"
        mine = {s.id: s for s in self.segments}
        if [r["id"] for r in disk["segments"]] != list(mine):
            return "the writer added a segment"
        for rec in disk["segments"]:
            seg = mine[rec["id"]]
            if (rec.get("index") is None) != (seg.record.get("index") is None):
                return f"segment {seg.id} finished building"
            if seg.mapped and len(seg.tail) >= TAIL_REOPEN_ROWS and rec.get("faiss_file") != seg.record.get("faiss_file"):
                return f"segment {seg.id} has a checkpoint with the {len(seg.tail)} rows searched apart"
        return None

    def _repaired(self, message: str) -> None:
        self.repairs.append(message)
        log.warning("%s: %s", self.path, message)

    def _require_write(self, what: str) -> None:
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
    def add(self, docs: list[DocRecord], vectors: np.ndarray, meta: dict[str, str] | None = None,
            fresh: bool = False) -> int:
        """Store docs in the active segment; durable on return. Same id replaces the old doc;
        `fresh`: the caller knows no id is stored yet (index/docstore.py DocStore.add)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(docs) != len(vectors):
            raise InvalidArgument(f"{len(docs)} documents but {len(vectors)} vectors")
        seen: set[str] = set()
        for d in docs:
            if d.modality not in MODALITY_CODES:
                raise InvalidArgument(f"document {d.id!r}: unknown modality {d.modality!r}")
            if d.id in seen:
                raise InvalidArgument(f"document id {d.id!r} appears twice in one batch")
            seen.add(d.id)
        self._require_write("add documents")
        with self.lock:
            seg = self.active
            if len(docs) and vectors.shape[1] != seg.dim:
                raise IndexMismatch(f"vectors have dimension {vectors.shape[1]}, the index expects {seg.dim}")
            first = len(seg.alive)
            vectors = self.docs.vectors.as_stored(vectors)  # FAISS holds what the store reads back
            replaced = self.docs.add(seg.id, first, docs, vectors, meta, fresh)
            seg.grow(first + len(docs))
            seg.alive[first:] = True
            seg.codes[first:] = [MODALITY_CODES[d.modality] for d in docs]
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
        self._require_write("delete documents")
        with self.lock:
            gone = self.docs.delete(ids)
            for _, s_id, row in gone:
                self._segment(s_id).alive[row] = False
        return [g[0] for g in gone]

    def finalize(self) -> None:
        """Choose, train and fill the FAISS index of every segment still without one."""
        self._require_write("finish the build")
        with self.lock:
            req = self.manifest["index_request"]
            built = []
            for seg in self.segments:
                if seg.faiss is not None:
                    continue
                built.append(seg)
                n = len(seg.alive)
                choice = vi.choose_index(req["kind"], n, seg.dim, req.get("memory_budget"))
                if n < vi.min_training_size(choice):
                    raise IndexError_(
                        f"IVF-PQ needs at least {vi.min_training_size(choice)} vectors to train its codebooks, "
                        f"the corpus has {n}; use --index flat or hnsw (or auto) for a corpus this small"
                    )
                seg.record["index"] = choice.to_dict()
                seg.record["faiss_file"] = f"segments/{seg.id}/index.faiss"
                log.info("segment %d: %s index over %d vectors (%s)", seg.id, choice.kind, n, choice.reason,
                         extra={"segment": seg.id})
                self._build_faiss(seg)
            target = req.get("target_recall")
            for seg in built if target else []:
                tuning = recall_tuning.tune_segment(self, seg, target)
                log.info("segment %d: %s for recall@%d %.3f (target %.3f), %.2f ms a query", seg.id, tuning.params,
                         tuning.k, tuning.recall, target, tuning.ms_per_query, extra={"segment": seg.id})
            for seg in self.segments:
                self.calibration(seg)  # fitted at build time and kept in the manifest
            self.manifest["state"] = "ready"
            self.save()

    def register_version(self, encoder: dict) -> int:
        """Record a new encoder version (not yet active); returns its number."""
        with self.lock:
            known = self.version_of_fingerprint(encoder["fingerprint"])
            if known is not None:
                return known
            v = max(r["version"] for r in self.versions) + 1
            self.versions.append({**encoder, "version": v, "registered": now()})
            return v

    def set_compensator(self, seg_id: int, from_version: int, modality: str, record: dict) -> None:
        seg = self._segment(seg_id)
        seg.record.setdefault("compensators", {}).setdefault(str(from_version), {})[modality] = record

    def activate(self, version: int) -> Segment:
        """Make `version` the query encoder and give it a segment for new documents.

        Older segments are never re-embedded; they are reached through their compensators.
        """
        self._require_write("activate an encoder version")
        with self.lock:
            rec = self.version(version)
            self.manifest["active_version"] = version
            if self.active.record["encoder"].get("version", 1) != version:
                base = self.segments[0].choice
                kind = "hnsw" if base is not None and base.kind == "hnsw" else "flat"
                choice = vi.choose_index(kind, 0, int(rec["dim"]))
                choice.reason = f"segment for encoder version {version} (new documents after an update)"
                seg_id = max(s.id for s in self.segments) + 1
                record = {"id": seg_id, "encoder": rec, "index": choice.to_dict(),
                          "faiss_file": f"segments/{seg_id}/index.faiss", "created": now()}
                self.manifest["segments"].append(record)
                seg = Segment(record, vi.new_index(choice, int(rec["dim"])))
                seg.dirty = True
                self.segments.append(seg)
            self.record_event("activated", version=version, fingerprint=rec["fingerprint"])
            self.save()
            return self.active

    def rebuild(self, seg: Segment, why: str) -> None:
        """Rebuild a segment's FAISS index from the document store, recorded as a repair."""
        self._require_write("rebuild FAISS")
        with self.lock:
            self._repaired(f"{why}; rebuilt its FAISS index from the document store ({len(seg.alive)} rows)")
            self._build_faiss(seg)

    def _build_faiss(self, seg: Segment) -> None:
        seg.set_index(self._faiss_of_rows(seg, None))
        seg.dirty = True

    def _faiss_of_rows(self, seg: Segment, rows: np.ndarray | None):
        """A FAISS index of the segment's rows `rows` (all of them: None), in that order,
        trained (IVF/PQ) on an equal share of each modality among them."""
        choice = seg.choice
        index = vi.new_index(choice, seg.dim)
        codes = seg.codes if rows is None else seg.codes[rows]
        if vi.needs_training(index):
            gpu.train_on_gpu(index)
            sample = vi.balanced_sample(codes, size=max(50_000, 64 * choice.params.get("nlist", 1)))
            index.train(self.docs.vectors_at(seg.id, sample if rows is None else rows[sample]))
        if rows is None:
            for _, vecs in self.docs.iter_vectors(seg.id):
                index.add(vecs)
        else:
            for start in range(0, len(rows), 8192):
                index.add(self.docs.vectors_at(seg.id, rows[start:start + 8192]))
        return index

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
        self._require_write("save")
        with self._checkpoint_lock:
            with self.lock:
                todo = [(seg, int(seg.faiss.ntotal)) for seg in self.segments if seg.faiss is not None and seg.dirty]
                for seg, _ in todo:
                    seg.dirty = False
                pending_rows, self.rows_since_checkpoint, self.dirty_since = self.rows_since_checkpoint, 0, None
            written = {}
            try:
                for seg, rows in todo:
                    # A new name per checkpoint, recorded by the manifest written after it: a crash
                    # in between leaves the manifest naming the previous file, still there and sound.
                    name = integrity.checkpoint_name(seg.id)
                    atomic_write(self.path / name, lambda tmp, s=seg: vi.write_index(s.faiss, tmp))
                    written[seg.id] = (name, integrity.checkpoint_record(self.path / name, rows, self.docs.epoch(seg.id)))
                    log.info("segment %d: checkpoint of %d rows written to %s", seg.id, rows, name,
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
        """Drop dead rows (replaced and deleted documents) and their tombstones, segment by
        segment. For each, the FAISS index of its live rows is written first, under a new name;
        then one document-store transaction renumbers the rows, bumps the segment's epoch and
        records that checkpoint; then the manifest names it. Killed before the transaction,
        nothing changed; after it, the next open takes the checkpoint the transaction recorded.
        Returns rows dropped per segment."""
        self._require_write("compact")
        dropped = {}
        with self.lock:
            for seg in self.segments:
                if seg.alive.all():
                    continue
                live = np.flatnonzero(seg.alive)
                epoch = self.docs.epoch(seg.id) + 1
                pending = None
                if seg.faiss is not None:
                    index = self._faiss_of_rows(seg, live)
                    name = integrity.checkpoint_name(seg.id)
                    atomic_write(self.path / name, lambda tmp, i=index: vi.write_index(i, tmp))
                    pending = {"faiss_file": name, **integrity.checkpoint_record(self.path / name, len(live), epoch)}
                dropped[seg.id] = self.docs.compact(seg.id, pending)
                seg.alive, seg.codes = self.docs.row_state(seg.id, self.docs.row_count(seg.id))
                if pending is not None:
                    old_file = seg.record.get("faiss_file")
                    seg.set_index(index)
                    integrity.adopt_pending(seg.record, pending)
                    seg.dirty = False
                    self._stale_files.append(old_file)
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

    def _allowed(self, seg: Segment, modalities: list[str] | None, flt: dict | None) -> np.ndarray:
        allowed = seg.alive.copy()
        if modalities:
            codes = [MODALITY_CODES[m] for m in modalities]
            allowed &= np.isin(seg.codes, codes)
        if flt:
            match = np.zeros_like(allowed)
            rows = self.docs.rows_matching(seg.id, flt)
            match[rows[rows < len(match)]] = True
            allowed &= match
        return allowed

    # -- modality calibration -------------------------------------------------------------
    def modality_counts(self, seg: Segment) -> dict[str, int]:
        """Live documents per modality (those with any). Asked on every search over several
        modalities or encoder versions, so kept until the segment's rows or deletions change
        (rows are only appended and deleted, never revived; compaction makes new arrays)."""
        key = (id(seg.alive), len(seg.alive), int(seg.alive.sum()))
        if seg.modality_counts is None or seg.modality_counts[0] != key:
            counts = {m: int(((seg.codes == c) & seg.alive).sum()) for m, c in MODALITY_CODES.items()}
            seg.modality_counts = (key, {m: n for m, n in counts.items() if n})
        return seg.modality_counts[1]

    def present_modalities(self, seg: Segment) -> list[str]:
        return list(self.modality_counts(seg))

    def calibration(self, seg: Segment) -> mc.ModalityCalibration | None:
        """The segment's score calibration (index/modality_calibration.py), refitted when the
        segment has grown or shrunk enough since; None while the segment is empty."""
        with self.lock:
            alive = int(seg.alive.sum())
            if alive == 0 or seg.faiss is None:
                return None
            cal = self._calibrations.get(seg.id)
            if cal is None and seg.record.get("calibration"):
                cal = mc.ModalityCalibration.from_record(seg.record["calibration"])
            if cal is None or cal.stale(alive, self.modality_counts(seg)):
                cal = self._fit_calibration(seg, alive)
                seg.record["calibration"] = cal.to_record()
            self._calibrations[seg.id] = cal
            return cal

    def _calibrated_pairs(self, seg: Segment) -> list[str]:
        """The query>document pairs a search over several of the segment's modalities is
        calibrated for, as they will be at the next search (fitted now where stale)."""
        if len(self.present_modalities(seg)) < 2:
            return []
        cal = self.calibration(seg)
        return sorted(cal.tables) if cal is not None else []

    def _fit_calibration(self, seg: Segment, alive: int, seed: int = 0) -> mc.ModalityCalibration:
        rng = np.random.default_rng(seed)
        present = self.present_modalities(seg)
        best: dict[tuple[str, str], np.ndarray] = {}
        counts = {m: np.flatnonzero((seg.codes == MODALITY_CODES[m]) & seg.alive) for m in present}
        enough = [m for m in present if len(counts[m]) >= mc.MIN_DOCUMENTS]
        for qm in enough:
            rows = counts[qm]
            rows = np.sort(rng.choice(rows, min(mc.PSEUDO_QUERIES, len(rows)), replace=False))
            q = np.ascontiguousarray(self.docs.vectors_at(seg.id, rows), dtype=np.float32)
            for dm in enough:
                scores, hits = self._search_segment(seg, q, 2, [dm], None)
                own = hits[:, 0] == rows  # a pseudo-query finds itself first: its best match is the next
                b = np.where(own, scores[:, 1], scores[:, 0])
                best[(qm, dm)] = b[np.isfinite(b)]
        return mc.fit_pairs(best, alive, present)

    def _calibrated_groups(self, segments: list[Segment], query_modalities: list[str] | None,
                           modalities: list[str] | None) -> dict[str, list[tuple[Segment, list[str]]]]:
        """Per query modality that gets calibrated scores: each segment with the document
        modalities it is searched for. A query modality is calibrated only when more than one
        document modality is searched and every segment has tables for all of them; otherwise
        its scores stay raw cosines, so one answer never mixes the two scales."""
        if not query_modalities:
            return {}
        wanted = [(seg, [m for m in self.present_modalities(seg) if not modalities or m in modalities])
                  for seg in segments]
        if len({m for _, ms in wanted for m in ms}) < 2:
            return {}
        out = {}
        for qm in set(query_modalities):
            cals = [self.calibration(seg) for seg, _ in wanted]
            if all(c is not None and c.covers(qm, ms) for c, (_, ms) in zip(cals, wanted)):
                out[qm] = wanted
        return out

    def search(self, queries: np.ndarray | Mapping[int, np.ndarray], k: int,
               modalities: list[str] | None = None, flt: dict | None = None,
               score_maps: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
               query_modalities: list[str] | None = None, calibrated: bool = True) -> list[list[SearchHit]]:
        """Top-k per query, merged over segments by score.

        `score_maps` gives, per segment of an older encoder version, each query's (scale,
        offset) onto the active encoder's cosines (index/version_scale.py); with it every
        segment's scores are bent into (-1, 1) alike and hits keep their raw `cosine`.

        With `query_modalities` (one per query) and `calibrated`, queries over documents of several
        modalities are searched per document modality and merged by calibrated score
        (`SearchHit.cosine` keeps the raw one); without them every score is a raw cosine.

        `queries` is one (n, dim) array for every segment, or a mapping segment id -> array
        when queries were mapped into each segment's space.
        """
        if not self.ready:
            raise IndexError_(f"the index at {self.path} is not finished; re-run its `umr index build` command to complete it")
        if k < 1:
            raise InvalidArgument("k must be at least 1")
        for m in modalities or []:
            if m not in MODALITY_CODES:
                raise InvalidArgument(f"unknown modality {m!r}: use image, text or image,text")
        validate_filter(flt)
        with self.lock:
            n_queries = len(next(iter(queries.values()))) if isinstance(queries, Mapping) else len(queries)
            per_query = [[] for _ in range(n_queries)]
            searched = [seg for seg in self.segments if seg.indexed_rows and seg.alive.any()]
            groups = self._calibrated_groups(searched, query_modalities if calibrated else None, modalities)
            qmods = np.array(query_modalities) if query_modalities else np.array([None] * n_queries)
            plain = np.flatnonzero(~np.isin(qmods, list(groups)))
            def hits_of(seg: Segment) -> list[tuple[int, list]]:
                """(query number, its candidates) from one segment."""
                found = []
                if isinstance(queries, Mapping) and seg.id not in queries:
                    raise IndexMismatch(f"no query vectors for segment {seg.id}")
                q = queries[seg.id] if isinstance(queries, Mapping) else queries
                q = np.ascontiguousarray(q, dtype=np.float32)
                if q.ndim != 2 or q.shape[1] != seg.dim:
                    raise IndexMismatch(f"query vectors have shape {q.shape}, segment {seg.id} expects (n, {seg.dim})")
                if len(plain):
                    raw, rows = self._search_segment(seg, q[plain], k, modalities, flt)
                    if score_maps:  # segments of several versions: all on the active scale, bent alike
                        scale, offset = score_maps.get(seg.id, (np.ones(n_queries), np.zeros(n_queries)))
                        scores = version_scale.apply(raw, scale[plain], offset[plain])
                    for j, qi in enumerate(plain):
                        cos = raw[j] if score_maps else [None] * len(raw[j])
                        found.append((qi, [(float(s), seg.id, int(r), None if c is None else float(c))
                                           for s, c, r in zip(scores[j] if score_maps else raw[j], cos, rows[j])
                                           if r >= 0]))
                for qm, wanted in groups.items():
                    idx = np.flatnonzero(qmods == qm)
                    cal = calibrations[seg.id]
                    for dm in dict(wanted)[seg]:
                        raw, rows = self._search_segment(seg, q[idx], k, [dm], flt)
                        scores = cal.apply(raw, qm, dm)
                        for j, qi in enumerate(idx):
                            found.append((qi, [(float(s), seg.id, int(r), float(c))
                                               for s, c, r in zip(scores[j], raw[j], rows[j]) if r >= 0]))
                return found

            # Fitted (and cached) here: calibration() takes the store lock, which this thread holds.
            calibrations = {seg.id: self.calibration(seg) for seg in searched} if groups else {}
            # Segments that scan many rows (exact and IVF; encoder versions, shards) are searched
            # side by side on the segment threads while this thread searches the rest: FAISS and
            # torch release the GIL. An HNSW walk takes well under a millisecond, less than handing
            # it to a thread costs (bench/segments.py). An empty segment (a new version's before
            # its first add) is not searched at all.
            heavy = [i for i, seg in enumerate(searched)
                     if seg.choice.traits.worth_a_thread and seg.indexed_rows >= PARALLEL_MIN_ROWS]
            pool = _segment_pool() if SEGMENT_THREADS > 1 and len(searched) > 1 else None
            futures = {i: pool.submit(hits_of, searched[i]) for i in heavy} if pool else {}
            here = {i: hits_of(seg) for i, seg in enumerate(searched) if i not in futures}
            per_segment = [futures[i].result() if i in futures else here[i] for i in range(len(searched))]
            for found in per_segment:
                for qi, candidates in found:
                    per_query[qi].extend(candidates)
            results = []
            for hits in per_query:
                hits.sort(key=lambda h: -h[0])
                hits = hits[:k]
                docs_by_seg: dict[int, dict[int, DocRecord]] = {}
                for seg_id in {h[1] for h in hits}:
                    docs_by_seg[seg_id] = self.docs.docs_at(seg_id, [h[2] for h in hits if h[1] == seg_id])
                out = []
                for score, seg_id, row, cosine in hits:
                    doc = docs_by_seg[seg_id].get(row)
                    if doc is not None:
                        out.append(SearchHit(doc.id, score, doc, seg_id, cosine=cosine))
                results.append(out)
        return results

    def segment_rows(self, seg: Segment, q: np.ndarray, k: int) -> np.ndarray:
        """The top-k rows of each query in one segment, every live row allowed (-1 past them)."""
        with self.lock:
            return self._search_segment(seg, np.ascontiguousarray(q, dtype=np.float32), k, None, None)[1]

    def tune(self, target: float, k: int = 10) -> dict[int, "recall_tuning.Tuning"]:
        """Pick each segment's search parameters for recall@k of `target` on its own vectors
        (index/recall_tuning.py) and save them, so every process that opens the index uses them."""
        self._require_write("tune search parameters")
        with self.lock:
            found = {seg.id: recall_tuning.tune_segment(self, seg, target, k)
                     for seg in self.segments if seg.faiss is not None and seg.alive.sum() > k + 1}
            self.manifest["index_request"]["target_recall"] = target
            self.record_event("tuned", target_recall=target, k=k,
                              segments={i: {"params": t.params, "recall": t.recall} for i, t in found.items()})
        self.save()
        return found

    def segment_scores(self, seg: Segment, q: np.ndarray, k: int, modalities: list[str] | None = None) -> np.ndarray:
        """The top-k raw scores of each query in one segment (-inf past its documents)."""
        with self.lock:
            return self._search_segment(seg, np.ascontiguousarray(q, dtype=np.float32), k, modalities, None)[0]

    def _search_segment(self, seg: Segment, q: np.ndarray, k: int, modalities, flt):
        n = len(q)
        empty = (np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64))
        if seg.indexed_rows == 0:
            return empty
        choice = seg.choice
        if not modalities and not flt and seg.alive.all():  # the common case: no mask to build
            allowed, n_allowed, everything = None, len(seg.alive), True
        else:
            allowed = self._allowed(seg, modalities, flt)
            n_allowed = int(allowed.sum())
            if n_allowed == 0:
                return empty
            everything = n_allowed == len(allowed)
        if choice.traits.scanned and seg.gpu is not None:  # a DeviceFlat takes masks
            return seg.gpu.search(q, k, None if everything else allowed)
        on_gpu = seg.gpu is not None and everything and k * 10 <= gpu.MAX_K
        if choice.traits.scanned:
            return vi.exact_topk(q, vi.flat_vectors(seg.faiss), k, None if everything else allowed)
        if not everything and n_allowed <= EXACT_FILTER_ROWS:
            rows = np.flatnonzero(allowed)
            scores, pos = vi.exact_topk(q, self.docs.vectors_at(seg.id, rows), k)
            return scores, np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
        selector, _bits = (None, None) if everything else vi.bitmap_selector(allowed)
        refine = int(choice.params.get("refine", 1)) if choice.traits.refines else 0
        kk = min(k * max(1, refine), n_allowed)
        if on_gpu:  # GPU FAISS takes no ID selector: unmasked searches only
            scores, rows = seg.gpu.search(q, kk)
        else:
            scores, rows = seg.faiss.search(q, kk, params=vi.search_params(choice, selector, kk))
        if refine:  # IVF-PQ: the top k*refine re-scored exactly, so scores are cosines (refine 1: the top k)
            scores, rows = self._refine(seg, q, rows, k)
        if len(seg.tail):
            scores, rows = self._with_tail(seg, q, k, scores, rows, allowed)
        return scores, rows

    @staticmethod
    def _with_tail(seg: Segment, q: np.ndarray, k: int, scores: np.ndarray, rows: np.ndarray,
                   allowed: np.ndarray | None):
        """Merge the exact top-k of the rows after a mapped checkpoint into the index's top-k."""
        first = int(seg.faiss.ntotal)
        mask = None if allowed is None else allowed[first:first + len(seg.tail)]
        t_scores, t_pos = vi.exact_topk(q, seg.tail, k, mask)
        t_rows = np.where(t_pos >= 0, t_pos + first, -1)
        all_s = np.concatenate([scores[:, :k], t_scores], axis=1)
        all_r = np.concatenate([rows[:, :k], t_rows], axis=1)
        all_s = np.where(all_r >= 0, all_s, -np.inf)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(all_s, order, 1), np.take_along_axis(all_r, order, 1)

    def _refine(self, seg: Segment, q: np.ndarray, rows: np.ndarray, k: int):
        """Re-score compressed-code candidates with the exact vectors kept in the docstore."""
        wanted = np.unique(rows[rows >= 0])
        if len(wanted) == 0:
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        vecs = self.docs.vectors_at(seg.id, wanted)
        pos = {int(r): i for i, r in enumerate(wanted)}
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_r = np.full((len(q), k), -1, dtype=np.int64)
        for qi in range(len(q)):
            cand = rows[qi][rows[qi] >= 0]
            exact = vecs[[pos[int(r)] for r in cand]] @ q[qi]
            top = np.argsort(-exact, kind="stable")[:k]
            out_s[qi, : len(top)] = exact[top]
            out_r[qi, : len(top)] = cand[top]
        return out_s, out_r

    def info(self) -> dict:
        with self.lock:
            segs = []
            for seg in self.segments:
                counts = {CODE_MODALITIES[c]: int(((seg.codes == c) & seg.alive).sum()) for c in CODE_MODALITIES}
                segs.append({
                    "id": seg.id,
                    "encoder_version": seg.record["encoder"].get("version", 1),
                    "encoder": seg.record["encoder"],
                    "compensators": seg.record.get("compensators", {}),
                    "index": seg.record.get("index"),
                    "documents": int(seg.alive.sum()),
                    "deleted_rows": int((~seg.alive).sum()),
                    "by_modality": {m: c for m, c in counts.items() if c},
                    "modality_calibration": self._calibrated_pairs(seg),
                    "vectors_in_faiss": int(seg.faiss.ntotal) if seg.faiss is not None else 0,
                    "search_runs_on": gpu.where_search_runs(seg.choice.kind, seg.gpu)
                    if seg.choice is not None else None,
                })
            return {
                "path": str(self.path),
                "state": self.manifest["state"],
                "format_version": self.manifest["format_version"],
                "encoder": self.version(self.active_version),  # the one queries are embedded with
                "built_with": self.manifest["encoder"],
                "documents": self.count(),
                "vectors": {"stored_in": self.docs.vectors.kind, "dtype": self.docs.vectors.dtype},
                "segments": segs,
                "search": gpu.describe(),
                "encoders": self.versions,
                "active_version": self.active_version,
                "build": self.manifest.get("build", {}),
                "created": self.manifest["created"],
                "updated": self.manifest["updated"],
            }
