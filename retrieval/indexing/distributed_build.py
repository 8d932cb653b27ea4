"""Index builds on a Ray cluster (`umr index build --ray auto|ADDRESS`).

The corpus is cut into shards of consecutive records. Ray Data carries each unfinished shard's
records through two stages: decoding and preprocessing in CPU tasks, and the forward pass on a
pool of actors that each hold one copy of the model (on a GPU when the cluster has them). The
driver writes every finished shard to disk (vectors as .npy, records as JSON lines) under one
atomic rename, then a merge step adds the shards in corpus order to the index through the same
accept/commit path as a single-process build, so ids, duplicates and rejections come out the
same, and `IndexStore.finalize` trains IVF/PQ on a cross-modal sample as always.

Resumable by shard: a shard on disk is never encoded again, and the merge commits the corpus
cursor with each shard, so a killed build, run again, encodes only the unfinished shards and
merges only what is not yet in the index. The cursor is the single-process build's, so either
kind of build can finish what the other started.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from umr.index import layout
from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore
from umr.retrieval.items import Item
from umr.retrieval.corpus.readers import Rejected

log = logging.getLogger("umr.retrieval")

SHARD_DIR = layout.RAY_SHARDS
VECTORS = "vectors.npy"
RECORDS = "records.jsonl"
# Records held by the driver at once: the shards of one wave, so a 10M-record corpus never
# sits in the driver's memory whole.
WAVE_RECORDS = 200_000


@dataclass
class RayBuildStats:
    """What the Ray part of a build did, for the report and the bench."""

    address: str = ""
    shards: int = 0
    shards_encoded: int = 0
    shards_reused: int = 0
    encode_s: float = 0.0
    merge_s: float = 0.0
    actors: int = 0
    gpus_per_actor: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def connect(address: str) -> str:
    """Join the cluster `address` names: "auto" is the one this machine belongs to (RAY_ADDRESS,
    or a `ray start` here), else a new single-machine cluster; anything else is a head node's
    address (HOST:6379 or ray://HOST:10001). Returns the address of the cluster joined."""
    try:
        import ray
    except ImportError:
        raise InvalidArgument("--ray needs Ray: pip install 'umr[distributed]' (ray[data])") from None

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address == "auto":
        try:
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError:
            log.info("no Ray cluster found on this machine; starting a local one")
            ray.init(**quiet)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise InvalidArgument(f"cannot reach the Ray cluster at {address}: {e}") from None
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the build draws its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its execution plans are not the user's business
    return ray.get_runtime_context().gcs_address


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds on an address nothing listens at: Ray itself retries for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"--ray takes auto or a head node's address HOST:PORT (or ray://HOST:PORT), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise InvalidArgument(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


# -- what runs on the cluster ------------------------------------------------------------------
_ENCODERS: dict[str, object] = {}


def _encoder(record: dict):
    """The index's encoder, loaded once per worker process (Ray reuses workers for tasks) and
    checked against the fingerprint the index recorded: a worker that resolves the spec to other
    weights (another version on another node) must not mix its vectors in."""
    from umr.retrieval.encoders.registry import load_recorded

    key = record["fingerprint"]
    if key not in _ENCODERS:
        enc = load_recorded(record)
        if enc.fingerprint != record["fingerprint"]:
            raise RuntimeError(f"this worker resolves encoder {record['spec']} to fingerprint {enc.fingerprint}, "
                               f"the index was started with {record['fingerprint']}: install the same encoder on every node")
        _ENCODERS[key] = enc
    return _ENCODERS[key]


def prepare_batch(batch: dict, encoder_record: dict, preparer=None) -> dict:
    """CPU task: decode and preprocess one block of records; a failure is kept per record.
    With the encoder's weight-free `preparer` the task never loads the model."""
    from umr.retrieval.indexing.build_steps import problem_of

    prepare = preparer.prepare if preparer is not None else (lambda item: _encoder(encoder_record).prepare(item, "document"))
    prepared, problems = [], []
    for rid, text, image, metadata in zip(batch["id"], batch["text"], batch["image"], batch["metadata"]):
        # A block whose records all lack a text (or an image) holds that column as floats, NaN
        # for None: every record of an images-only corpus came back "text" NaN and was rejected.
        text, image = (text if isinstance(text, str) else None), (image if isinstance(image, str) else None)
        try:
            prepared.append(prepare(Item(rid, text, image, json.loads(metadata))))
            problems.append("")
        except Exception as e:  # reported per record, as the single-process build does
            prepared.append(None)
            problems.append(problem_of(e))
    # "" for no problem: Ray Data turns a column of Nones into floats.
    return {"ordinal": batch["ordinal"], "prepared": _objects(prepared), "problem": np.array(problems, dtype=object)}


class EmbedActor:
    """One model per actor: the forward pass over prepared blocks."""

    def __init__(self, encoder_record: dict, threads: int = 0):
        import torch

        from umr.retrieval.cpu_memory import keep_freed_memory

        keep_freed_memory()  # the actor's process only runs forwards: as in umr's own (retrieval/cpu_memory.py)
        if threads:  # Ray sets OMP_NUM_THREADS to the 1 CPU the actor reserves; its forward may use its share
            torch.set_num_threads(threads)
        self.encoder = _encoder(encoder_record)
        self.dim = int(encoder_record["dim"])

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, p in enumerate(batch["problem"]) if not p]
        vectors = np.zeros((len(batch["ordinal"]), self.dim), dtype=np.float32)
        if ok:
            vectors[ok] = self.encoder.embed([batch["prepared"][i] for i in ok])
        return {"ordinal": batch["ordinal"], "vector": vectors, "problem": batch["problem"]}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# -- shards on disk ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    start: int  # ordinal of its first record
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.start:012d}-{self.count}"


def shard_root(out: Path) -> Path:
    return Path(out) / SHARD_DIR


def _record_json(ordinal: int, rec: Item | Rejected, problem: str | None) -> dict:
    if isinstance(rec, Rejected):
        return {"ordinal": ordinal, "id": rec.id, "rejected": rec.reason}
    out = {"ordinal": ordinal, "id": rec.id, "text": rec.text, "image": rec.image, "metadata": rec.metadata}
    if problem is not None:
        out["problem"] = problem
    return out


def write_shard(root: Path, shard: Shard, records: list[dict], vectors: np.ndarray) -> Path:
    """All of a shard or none of it: written beside its final name, then renamed into place."""
    final = root / shard.name
    tmp = root / f".{shard.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
    with open(tmp / RECORDS, "w", encoding="utf-8", errors="surrogateescape") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_shard(root: Path, shard: Shard) -> tuple[list[tuple[int, Item | Rejected, str | None]], np.ndarray]:
    """(ordinal, record, problem) per record, and one vector per record (zeros where it failed)."""
    folder = root / shard.name
    vectors = np.load(folder / VECTORS, allow_pickle=False)
    rows = []
    with open(folder / RECORDS, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            r = json.loads(line)
            if "rejected" in r:
                rows.append((r["ordinal"], Rejected(r["id"], r["rejected"]), None))
            else:
                rows.append((r["ordinal"], Item(r["id"], r["text"], r["image"], r["metadata"]), r.get("problem")))
    if len(rows) != shard.count or len(vectors) != shard.count:
        raise InvalidArgument(f"{folder} holds {len(rows)} records and {len(vectors)} vectors, not {shard.count}; "
                              "delete it and run the build again to encode it anew")
    return rows, vectors


# -- the driver ----------------------------------------------------------------------------------
def _shards_of(records: Iterable[Item | Rejected], start: int, shard_size: int) -> Iterator[tuple[Shard, list]]:
    """The corpus from ordinal `start`, cut into shards of `shard_size` (ordinal, record)."""
    from umr.retrieval.indexing.build_steps import chunks, numbered

    for chunk in chunks(numbered(records, start), shard_size):
        yield Shard(chunk[0][0], len(chunk)), chunk


CPUS_PER_ACTOR = 2


def _resources() -> tuple[int, float]:
    """How many model actors, and GPUs for each: one per GPU when the cluster has GPUs,
    else one per CPUS_PER_ACTOR CPUs. A CPU actor reserves one of them, so the preprocessing
    tasks are scheduled beside it, and runs its forward on all of them, as a single-process
    build runs its forward on every core beside its preparation workers."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = int(total.get("CPU", 1))
    return (gpus, 1.0) if gpus else (max(1, cpus // CPUS_PER_ACTOR), 0.0)


def encode_shards(root: Path, encoder_record: dict, shards: list[tuple[Shard, list]], stats: RayBuildStats,
                  batch_size: int, progress=None, preparer=None) -> None:
    """Encode a wave of shards on the cluster and write each one as soon as it is complete."""
    import ray

    dim = int(encoder_record["dim"])
    rows, pending = [], {}
    for shard, entries in shards:
        got = {"records": {}, "problems": {}, "vectors": np.zeros((shard.count, dim), dtype=np.float32), "left": 0}
        for ordinal, rec in entries:
            if not isinstance(rec, Rejected):
                # Ray Data carries plain values: a Path becomes the string it names.
                rec = Item(rec.id, rec.text, str(rec.image) if isinstance(rec.image, Path) else rec.image, rec.metadata)
                rows.append({"ordinal": ordinal, "id": rec.id, "text": rec.text, "image": rec.image,
                             "metadata": json.dumps(rec.metadata)})
                got["left"] += 1
            got["records"][ordinal] = rec
        pending[shard] = got
    by_ordinal = {o: s for s, entries in shards for o, _ in entries}

    def finish(shard: Shard) -> None:
        got = pending.pop(shard)
        recs = [_record_json(o, got["records"][o], got["problems"].get(o))
                for o in range(shard.start, shard.start + shard.count)]
        write_shard(root, shard, recs, got["vectors"])
        stats.shards_encoded += 1
        if progress is not None:
            progress.update(shard.count)

    for shard in [s for s, g in pending.items() if g["left"] == 0]:
        finish(shard)
    if not rows:
        return
    n_actors, gpus = _resources()
    stats.actors, stats.gpus_per_actor = n_actors, gpus
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * len(shards))))
    # Half a CPU per preprocessing task: besides the model actors' CPUs, and (unlike equal
    # requests) not fused into the actors, so decoding runs beside the forward, not before it.
    ds = ds.map_batches(prepare_batch, fn_kwargs={"encoder_record": encoder_record, "preparer": preparer},
                        batch_size=batch_size, batch_format="numpy", num_cpus=0.5)
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"encoder_record": encoder_record,
                                                           "threads": 0 if gpus else CPUS_PER_ACTOR},
                        batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=gpus,
                        num_cpus=0 if gpus else 1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for ordinal, vector, problem in zip(batch["ordinal"], batch["vector"], batch["problem"]):
            ordinal = int(ordinal)
            shard = by_ordinal[ordinal]
            got = pending[shard]
            if problem:
                got["problems"][ordinal] = problem
            got["vectors"][ordinal - shard.start] = vector
            got["left"] -= 1
            if got["left"] == 0:
                finish(shard)
    if pending:
        raise RuntimeError(f"the cluster returned no vectors for {sum(g['left'] for g in pending.values())} records")


def ray_ingest(store: IndexStore, encoder, records: Iterable[Item | Rejected], report, *, start: int, address: str,
               shard_size: int, batch_size: int, strict: bool, journal, progress=None) -> RayBuildStats:
    """Encode the corpus from ordinal `start` on a Ray cluster, then merge its shards in order."""
    from umr.retrieval.indexing.build_steps import accept, commit

    if shard_size < 1:
        raise InvalidArgument("--shard-size must be at least 1")
    stats = RayBuildStats(address=connect(address))
    root = shard_root(store.path)
    root.mkdir(exist_ok=True)
    for stale in root.glob(".shard-*.tmp-*"):  # a wave killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    record, preparer = encoder.record(), encoder.preparer()
    t0 = time.perf_counter()
    plan, wave, in_wave = [], [], 0
    for shard, entries in _shards_of(records, start, shard_size):
        plan.append(shard)
        if (root / shard.name).exists():
            stats.shards_reused += 1
            if progress is not None:
                progress.update(shard.count)
            continue
        wave.append((shard, entries))
        in_wave += shard.count
        if in_wave >= WAVE_RECORDS:
            encode_shards(root, record, wave, stats, batch_size, progress, preparer)
            wave, in_wave = [], 0
    if wave:
        encode_shards(root, record, wave, stats, batch_size, progress, preparer)
    stats.shards = len(plan)
    stats.encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    seen = set()
    for shard in plan:
        rows, vectors = read_shard(root, shard)
        kept = accept(rows, report, seen, journal, strict)
        commit(store, [rows[i][1] for i in kept], vectors[kept] if kept else None, report, journal,
               shard.start + shard.count)
    stats.merge_s = time.perf_counter() - t0
    log.info("ray build: %d shards (%d encoded, %d reused) with %d actor(s); encode %.1fs, merge %.1fs",
             stats.shards, stats.shards_encoded, stats.shards_reused, stats.actors, stats.encode_s, stats.merge_s)
    return stats


def remove_shards(out: Path) -> None:
    """Once the index is finished its shards are redundant: every vector is in the index."""
    shutil.rmtree(shard_root(out), ignore_errors=True)
