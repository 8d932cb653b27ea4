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

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from umr.index.documents import DocRecord, PlainDocs
from umr.index.document_rules import MAX_ID_CHARS, InvalidDocument, check_document
from umr.index.errors import IndexMismatch, InvalidArgument
from umr.retrieval.cpu_memory import keeping_freed_memory
from umr.retrieval.encoders.base import Encoder
from umr.retrieval.items import MODALITIES, Item
from umr.retrieval.corpus.readers import Rejected


@dataclass
class ImportedItem(Item):
    """A document whose vector already exists: its modality is declared, not read off content."""

    declared: str = "image"
    checked_metadata: str | None = None  # what check_document returned: the store does not check again

    @property
    def modality(self) -> str:
        return self.declared

    def image_ref(self) -> str | None:
        if self.image is None:
            return None
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


def read_ids(path: str | Path, default_modality: str, start: int = 0) -> Iterator[Item | str | Rejected]:
    """One Item (or Rejected) per line of ids.jsonl from line `start` (0-based) on, blank lines
    included: line n is row n. Lines before `start` (a resumed build's) are not parsed. A plain
    id comes as the string it is, checked already (a document of `default_modality`)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = itertools.islice(f, start, None)
        lineno = start
        while block := list(itertools.islice(lines, PLAIN_BLOCK_LINES)):
            plain = plain_ids(block)
            if plain is not None:  # the common case of a large import: no per-line parsing or checks
                yield from plain
            else:
                for i, line in enumerate(block, lineno + 1):
                    yield read_record(line, i, path.parent, default_modality)
            lineno += len(block)


def read_record(line: str, lineno: int, base: Path, default_modality: str) -> Item | Rejected:
    """One line of ids.jsonl: a JSON string (the id) or an object with an id."""
    rec = plain_id(line)  # read without the JSON parser, checked below like any other
    if rec is None:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return Rejected(f"line {lineno}", f"invalid JSON ({e.msg})")
    if isinstance(rec, (str, int)):
        rec = {"id": str(rec)}
    if not isinstance(rec, dict) or rec.get("id") in (None, ""):
        return Rejected(f"line {lineno}", "expected an id string or an object with an id")
    doc_id, text, image, meta = str(rec["id"]), rec.get("text"), rec.get("image"), rec.get("metadata") or {}
    if image is not None and not isinstance(image, str):
        return Rejected(doc_id, "image must be a path string")
    if image and "://" not in image and not Path(image).is_absolute():
        image = str(base / image)
    content = Item(doc_id, text, image).modality if (image or (isinstance(text, str) and text.strip())) else None
    modality = rec.get("modality") or content or default_modality
    if modality not in MODALITIES:
        return Rejected(doc_id, f"unknown modality {modality!r} (use image, text or image,text)")
    try:
        blob = check_document(doc_id, text, meta, image)
    except InvalidDocument as e:
        return Rejected(doc_id, str(e))
    return ImportedItem(doc_id, text, image, meta, declared=modality, checked_metadata=blob)


# A block of lines each a JSON string of printable ASCII without quotes or escapes: ids that
# check_document would pass as they are, unless one is '.', '..' or ends in '/image' (looked for
# apart). Every line ends in a newline but perhaps the file's last.
PLAIN_BLOCK = re.compile(r'(?:"[ !#-\[\]-~]{1,%d}"\n)*(?:"[ !#-\[\]-~]{1,%d}"\n?)' % (MAX_ID_CHARS, MAX_ID_CHARS))
NOT_PLAIN = re.compile(r'^"\.{1,2}"$|/image"$', re.M)
PLAIN_BLOCK_LINES = 4096


def plain_ids(block: list[str]) -> list[str] | None:
    """The ids of a block of lines when every line is a plain id (PLAIN_BLOCK), else None."""
    text = "".join(block)
    if not PLAIN_BLOCK.fullmatch(text) or NOT_PLAIN.search(text):
        return None
    return [line[1:line.rindex('"')] for line in block]


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
    """float32 unit rows (umr's inner product is cosine), and which rows can be one at all
    (the others are zero). Divides in place: `x` is a batch just read, used once."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no squared copy of the batch, as np.linalg.norm makes
    ok = np.isfinite(norms) & (norms > 0)
    if ok.all():
        x /= norms[:, None]
        return x, ok
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


def ingest_vectors(store, vectors: VectorFile, ids: Iterator[Item | str | Rejected], report, *, start: int,
                   batch_size: int, strict: bool, journal, modality: str = "image", progress=None) -> None:
    """Rows from `start` on, `batch_size` at a time, each batch committed with the cursor; `ids`
    yields the records of those rows (read_ids from the same `start`, plain ids of `modality`)."""
    from umr.retrieval.indexing.build_steps import accept, commit

    seen: set[str] = set()
    t0 = time.perf_counter()
    n = len(vectors)
    for first in range(start, n, batch_size):
        last = min(n, first + batch_size)
        block, ok = unit_rows(vectors[first:last])
        records = list(itertools.islice(ids, last - first))
        if len(records) != last - first:
            raise InvalidArgument(f"the ids file ended at row {first + len(records)} of {n}: was it changed during the build?")
        plain = plain_batch(records, ok, journal)
        if plain is not None:
            report.read += len(plain)
            commit(store, PlainDocs(plain, modality), block, report, journal, last)
        else:  # row by row: each record, bad vector and repeat judged by accept
            rows = [(first + i, DocRecord(rec, modality, checked_metadata="{}") if type(rec) is str else rec, None)
                    for i, rec in enumerate(records)]
            for i in np.flatnonzero(~ok).tolist():
                if not isinstance(rows[i][1], Rejected):
                    rows[i] = (first + i, rows[i][1], "vector is zero or not finite")
            kept = accept(rows, report, seen, journal, strict)
            commit(store, [rows[i][1] for i in kept], block[kept] if kept else None, report, journal, last)
        if progress is not None:
            progress.update(last - first)
    report.seconds += time.perf_counter() - t0


def plain_batch(records: list, ok: np.ndarray, journal) -> list[str] | None:
    """The batch's ids where every row is a plain id with a usable vector, none twice and none
    stored yet: what accept would keep whole, stored as PlainDocs. None where a row needs
    accept's look (a record, a bad vector, a repeated id), and without a journal, whose run
    finds repeats in the set of ids accept keeps rather than in the store."""
    if journal is None or not ok.all() or not all(type(r) is str for r in records) or len(set(records)) != len(records):
        return None
    return None if journal.stored_ids(records) else records


def build_from_vectors(vectors: str | Path, ids: str | Path, encoder: Encoder, out: str | Path, *,
                       modality: str = "image", index_kind: str = "auto", memory_budget: int | None = None,
                       batch_size: int = 65536, strict: bool = False, progress: bool = True,
                       vector_dtype: str = "float32", target_recall: float | None = None):
    """Build (or resume building) an index of precomputed vectors; resumable like any build."""
    from umr.retrieval.indexing.pipeline import run_build

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
        with keeping_freed_memory():  # equal batches of rows; FAISS training and tuning follow at glibc's defaults
            ingest_vectors(store, x, read_ids(ids, modality, start), report, start=start, batch_size=batch_size,
                           strict=strict, journal=journal, modality=modality, progress=bar)

    return run_build(out, encoder, source, str(vectors), len(x), run, index_kind=index_kind,
                     memory_budget=memory_budget, batch_size=batch_size, progress=progress, vector_dtype=vector_dtype,
                     target_recall=target_recall)
