"""Locked-tower features on disk, so training, mining, evaluation and benches compute each text
and each image once, across processes and across runs.

A feature is fixed by the tower (its weights digest and input settings: the namespace) and by
the item's content (sha256 of the image file's bytes, or of the text), so the key never goes
stale: a photo edited in place gets a new key, a copy of it under another name hits.

Every write is a new shard file (safetensors: `keys` N x 32 bytes, `rows` N x dim, float32 or
float16 per namespace)
renamed into place, so concurrent processes never write the same file and a reader never sees
half a shard; two processes computing the same items at once merely store them twice. A shard
that cannot be read (a damaged disk, a foreign file) is skipped with a warning and its items
are computed again. Nothing is ever pickled.

`UMR_CACHE_DIR` moves the cache (default `~/.cache/umr`, features under `features/`);
`UMR_FEATURE_CACHE=off` turns it off. Delete the folder to reclaim the space.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from umr.index.atomic import atomic_write
from umr.index.errors import InvalidArgument

SHARD_ROWS = 2048
SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}  # rows per shard: a killed run keeps all but the last few hundred items


def cache_root() -> Path | None:
    """The features folder, or None when the cache is turned off."""
    if os.environ.get("UMR_FEATURE_CACHE", "").lower() in ("off", "0", "false", "no"):
        return None
    base = os.environ.get("UMR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "umr")
    return Path(base) / "features"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def bytes_key(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def file_key(path: str | os.PathLike) -> bytes:
    from umr.retrieval.encoders.base import sha256_file

    return bytes.fromhex(sha256_file(path))


class FeatureCache:
    """Rows of one namespace (one tower, one kind of feature), looked up by content key."""

    _open: dict[tuple[Path, int, str], "FeatureCache"] = {}
    _open_lock = threading.Lock()

    def __init__(self, folder: Path, dim: int, dtype=np.float32):
        self.folder = Path(folder)
        self.dim = dim
        self.dtype = np.dtype(dtype)  # how rows are stored; they are always returned as float32
        self._where: dict[bytes, tuple[Path, int]] = {}
        self._seen: set[Path] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_namespace(cls, namespace: str, dim: int, dtype=np.float32) -> "FeatureCache | None":
        """One object per folder in a process, so its shard index is read once, not per call."""
        root = cache_root()
        if root is None:
            return None
        with cls._open_lock:
            key = (root / namespace, dim, np.dtype(dtype).name)
            return cls._open.setdefault(key, cls(root / namespace, dim, dtype))

    def _scan(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        from safetensors import safe_open

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.safetensors")):
            if shard in self._seen:
                continue
            self._seen.add(shard)
            try:
                with safe_open(str(shard), framework="np") as f:
                    keys = f.get_tensor("keys")
                    rows = f.get_slice("rows")
                    shape, dtype = rows.get_shape(), rows.get_dtype()
                if keys.ndim != 2 or keys.shape[1] != 32 or list(shape) != [len(keys), self.dim]:
                    raise InvalidArgument(f"keys {keys.shape}, rows {shape}, expected rows of {self.dim}")
                if SAFETENSORS_DTYPES.get(dtype) != self.dtype:
                    raise InvalidArgument(f"rows of {dtype}, expected {self.dtype.name}")
            except Exception as e:  # a damaged or foreign file costs a recomputation, never a crash
                warnings.warn(f"feature cache: skipping unreadable shard {shard.name} ({e})", stacklevel=2)
                continue
            for r, k in enumerate(keys):
                self._where.setdefault(k.tobytes(), (shard, r))

    def get(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, rows): rows of keys not found are zeros."""
        from safetensors import safe_open

        with self._lock:
            if any(k not in self._where for k in keys):
                self._scan()
            hits = [(i, self._where.get(k)) for i, k in enumerate(keys)]
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, hit in hits:
            if hit is not None:
                by_shard.setdefault(hit[0], []).append((i, hit[1]))
        for shard, pairs in by_shard.items():
            try:
                with safe_open(str(shard), framework="np") as f:
                    rows = f.get_tensor("rows")
            except Exception as e:
                warnings.warn(f"feature cache: shard {shard.name} became unreadable ({e}); recomputing", stacklevel=2)
                with self._lock:
                    for k in [k for k, (s, _) in self._where.items() if s == shard]:
                        del self._where[k]
                continue
            idx = np.array(pairs)
            out[idx[:, 0]] = rows[idx[:, 1]]
            found[idx[:, 0]] = True
        return found, out

    def put(self, keys: list[bytes], rows: np.ndarray) -> None:
        from safetensors.numpy import save_file

        if not len(keys):
            return
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape != (len(keys), self.dim):
            raise InvalidArgument(f"feature cache: {rows.shape} rows for {len(keys)} keys of dim {self.dim}")
        shard = self.folder / f"{uuid.uuid4().hex}.safetensors"
        tensors = {"keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32).copy(), "rows": rows}
        atomic_write(shard, lambda tmp: save_file(tensors, tmp))
        with self._lock:
            self._seen.add(shard)
            for r, k in enumerate(keys):
                self._where.setdefault(k, (shard, r))


def cached_rows(cache: FeatureCache | None, keys: list[bytes | None], dim: int,
                compute: Callable[[list[int]], Iterator[tuple[list[int], np.ndarray]]],
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Rows for every key: looked up, and the missing ones computed by `compute(positions)`,
    which yields (positions, rows) chunk by chunk; chunks are stored as they come, so an
    interrupted run keeps what it finished. A None key (an item with no content hash: a
    decoded image) is always computed and never stored. `progress(n)` counts items done,
    hits included."""
    out = np.zeros((len(keys), dim), dtype=np.float32)
    found = np.zeros(len(keys), dtype=bool)
    keyed = [i for i, k in enumerate(keys) if k is not None]
    if cache is not None and keyed:
        hit, rows = cache.get([keys[i] for i in keyed])
        out[np.array(keyed)[hit]] = rows[hit]
        found[np.array(keyed)[hit]] = True
    if progress and found.any():
        progress(int(found.sum()))
    missing = [int(i) for i in np.flatnonzero(~found)]
    # One computation per distinct key: duplicates in the input are filled from the first.
    first: dict[bytes, int] = {}
    todo = [i for i in missing if keys[i] is None or first.setdefault(keys[i], i) == i]
    pend_k: list[bytes] = []
    pend_r: list[np.ndarray] = []
    for positions, rows in compute(todo):
        if cache is not None and cache.dtype != np.float32:  # what a later hit will return, bit for bit
            rows = np.asarray(rows).astype(cache.dtype)
        rows = np.asarray(rows, dtype=np.float32)
        out[positions] = rows
        stored = [r for r, p in enumerate(positions) if keys[p] is not None]
        if cache is not None and stored:
            pend_k.extend(keys[positions[r]] for r in stored)
            pend_r.append(rows[stored])
            if len(pend_k) >= SHARD_ROWS:
                cache.put(pend_k, np.concatenate(pend_r))
                pend_k, pend_r = [], []
        if progress:
            progress(len(positions))
    if cache is not None and pend_k:
        cache.put(pend_k, np.concatenate(pend_r))
    for i in missing:
        if keys[i] is None:
            continue
        j = first[keys[i]]
        if j != i:
            out[i] = out[j]
            if progress:
                progress(1)
    return out


def chunked(positions: list[int], size: int) -> Iterable[list[int]]:
    return (positions[i : i + size] for i in range(0, len(positions), size))
