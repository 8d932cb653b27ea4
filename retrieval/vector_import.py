"""Indexes from precomputed embeddings: `umr index build --vectors emb.npy --ids ids.jsonl`.

The form clip-retrieval users already have (an embeddings array and its ids/metadata), and the
way to build an index of tens of millions of vectors without running an encoder: the array is
read in batches (plain reads, not a memory map: a map's touched pages would count as the
build's resident memory, 10 GB at 10M x 256), so memory stays flat whatever its size. `--encoder` names
the model the vectors came from; it is recorded as the index's query encoder (and must have
their dimension) but never run here.

ids.jsonl has one line per row of the array, in order: a JSON string (the id) or an object
{"id", "text", "image", "metadata", "modality"}. A record that names no modality and holds no
text or image gets `--modality` (default image: clip-retrieval embeds images).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from index.document_rules import InvalidDocument, check_document
from index.errors import IndexMismatch, InvalidArgument
from retrieval.encoders.base import Encoder
from retrieval.items import MODALITIES, Item
from retrieval.readers import Rejected


@dataclass
class ImportedItem(Item):
    """A document whose vector already exists: its modality is declared, not read off content."""

    declared: str = "image"
    checked_metadata: str | None = None  # what check_document returned: the store does not check again

    @property
    def modality(self) -> str:
        return self.declared

    def image_ref(self) -> str | None:
        if isinstance(self.image, str) and "://" in self.image:
            return self.image  # a URL, as clip-retrieval's metadata holds them
        return super().image_ref()


class VectorFile:
    """Rows of an (n, dim) .npy array read on demand: `len()` and `[first:last]`."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, shape, dtype, offset

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        first, last, _ = rows.indices(self.shape[0])
        dim = self.shape[1]
        count = max(0, last - first) * dim
        x = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset + first * dim * self.dtype.itemsize)
        return x.reshape(-1, dim)


def open_vectors(path: str | Path, dim: int) -> VectorFile:
    """The (n, dim) array of a .npy file, its rows read on demand; a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"vectors not found: {path}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
    except ValueError as e:
        raise InvalidArgument(f"{path} is not a NumPy .npy array of numbers ({e})") from None
    if len(shape) != 2 or dtype.kind not in "fiu" or dtype.hasobject:
        raise InvalidArgument(f"{path} holds a {dtype} array of shape {shape}; expected (n, dim) floats")
    if fortran_order:
        raise InvalidArgument(f"{path} is stored column by column (Fortran order); save it with "
                              "np.save(path, np.ascontiguousarray(x))")
    if shape[1] != dim:
        raise IndexMismatch(f"{path} holds vectors of dimension {shape[1]}; the encoder has dimension {dim}: "
                            "give the --encoder that made them")
    if path.stat().st_size < offset + shape[0] * shape[1] * dtype.itemsize:
        raise InvalidArgument(f"{path} is shorter than its header says ({shape[0]} x {shape[1]} {dtype}): truncated?")
    return VectorFile(path, shape, dtype, offset)


def read_ids(path: str | Path, default_modality: str, start: int = 0) -> Iterator[Item | Rejected]:
    """One Item (or Rejected) per line of ids.jsonl from line `start` (0-based) on, blank lines
    included: line n is row n. Lines before `start` (a resumed build's) are not parsed."""
    path = Path(path)
    base = path.parent
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= start:
                continue
            rec = plain_id(line)  # most lines of a large import: read without the JSON parser
            if rec is None:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Rejected(f"line {lineno}", f"invalid JSON ({e.msg})")
                    continue
            if isinstance(rec, (str, int)):
                rec = {"id": str(rec)}
            if not isinstance(rec, dict) or rec.get("id") in (None, ""):
                yield Rejected(f"line {lineno}", "expected an id string or an object with an id")
                continue
            doc_id, text, image, meta = str(rec["id"]), rec.get("text"), rec.get("image"), rec.get("metadata") or {}
            if image is not None and not isinstance(image, str):
                yield Rejected(doc_id, "image must be a path string")
                continue
            if image and "://" not in image and not Path(image).is_absolute():
                image = str(base / image)
            content = Item(doc_id, text, image).modality if (image or (isinstance(text, str) and text.strip())) else None
            modality = rec.get("modality") or content or default_modality
            if modality not in MODALITIES:
                yield Rejected(doc_id, f"unknown modality {modality!r} (use image, text or image,text)")
                continue
            try:
                blob = check_document(doc_id, text, meta, image)
            except InvalidDocument as e:
                yield Rejected(doc_id, str(e))
                continue
            yield ImportedItem(doc_id, text, image, meta, declared=modality, checked_metadata=blob)


def plain_id(line: str) -> str | None:
    """The id of a line that is just a JSON string with no escapes (`"abc"`), read without the
    JSON parser; None for any other line (parsed in full)."""
    end = line.rfind('"')
    if end <= 0 or line[0] != '"' or "\\" in line or line.find('"', 1) != end or line[end + 1:].strip():
        return None
    return line[1:end] or None


def count_lines(path: Path) -> int:
    """Lines as read_ids reads them: a last line without its newline counts."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 unit rows (umr's inner product is cosine), and which rows can be one at all."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


def ingest_vectors(store, vectors: VectorFile, ids: Iterator[Item | Rejected], report, *, start: int,
                   batch_size: int, strict: bool, journal, progress=None) -> None:
    """Rows from `start` on, `batch_size` at a time, each batch committed with the cursor; `ids`
    yields the records of those rows (read_ids from the same `start`)."""
    from retrieval.pipeline import accept, commit

    seen: set[str] = set()
    t0 = time.perf_counter()
    n = len(vectors)
    for first in range(start, n, batch_size):
        last = min(n, first + batch_size)
        block, ok = unit_rows(vectors[first:last])
        rows = []
        for i in range(last - first):
            rec = next(ids)
            problem = None if isinstance(rec, Rejected) or ok[i] else "vector is zero or not finite"
            rows.append((first + i, rec, problem))
        kept = accept(rows, report, seen, journal, strict)
        commit(store, [rows[i][1] for i in kept], block[kept] if kept else None, report, journal, last)
        if progress is not None:
            progress.update(last - first)
    report.seconds += time.perf_counter() - t0


def build_from_vectors(vectors: str | Path, ids: str | Path, encoder: Encoder, out: str | Path, *,
                       modality: str = "image", index_kind: str = "auto", memory_budget: int | None = None,
                       batch_size: int = 65536, strict: bool = False, progress: bool = True):
    """Build (or resume building) an index of precomputed vectors; resumable like any build."""
    from retrieval.pipeline import run_build

    if modality not in MODALITIES:
        raise InvalidArgument(f"unknown modality {modality!r} (use image, text or image,text)")
    vectors, ids = Path(vectors), Path(ids)
    x = open_vectors(vectors, encoder.dim)
    if not ids.exists():
        raise FileNotFoundError(f"ids not found: {ids}")
    lines = count_lines(ids)
    if lines != len(x):
        raise InvalidArgument(f"{vectors} has {len(x)} vectors but {ids} has {lines} lines: one id per vector, in order")
    source = {"vectors": str(vectors.resolve()), "ids": str(ids.resolve()), "format": "vectors"}

    def run(store, journal, report, start, bar):
        ingest_vectors(store, x, read_ids(ids, modality, start), report, start=start, batch_size=batch_size,
                       strict=strict, journal=journal, progress=bar)

    return run_build(out, encoder, source, str(vectors), len(x), run, index_kind=index_kind,
                     memory_budget=memory_budget, batch_size=batch_size, progress=progress)
