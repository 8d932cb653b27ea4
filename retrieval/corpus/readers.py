"""Corpus readers: JSONL, an image folder with same-name .txt captions, an M-BEIR candidate pool.

Readers yield either an Item or a Rejected record, never raise on a bad record: a build
counts and reports bad records and goes on (or stops at the first under --strict). Checks
that need the image decoded (missing, corrupt, oversized) happen in the indexing pipeline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from umr.index.document_rules import InvalidDocument, check_document, has_visible_text
from umr.index.errors import InvalidArgument
from umr.retrieval.items import MODALITIES, Item

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_TEXT_CHARS = 100_000


@dataclass
class Rejected:
    id: str
    reason: str

    def __post_init__(self):
        # An id that is not valid Unicode is reported escaped, so the report itself prints.
        self.id = str(self.id).encode("utf-8", "backslashreplace").decode("utf-8")

    def to_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason}


def _problem(item: Item) -> str | None:
    """Why the item cannot be indexed (and served back), or None."""
    if item.text is not None and not isinstance(item.text, str):
        return "text must be a string"
    if item.text is not None and len(item.text) > MAX_TEXT_CHARS:
        return f"text has {len(item.text)} characters, over the limit of {MAX_TEXT_CHARS}"
    if item.image is None and not has_visible_text(item.text):
        return "empty item: neither text nor image"
    try:
        check_document(item.id, item.text, item.metadata, item.image if isinstance(item.image, str) else None)
    except InvalidDocument as e:
        return str(e)
    return None


def _json_objects(path: Path) -> Iterator[tuple[int, dict | Rejected]]:
    """(line number, parsed object) per non-blank line; a line that is not an object is Rejected.
    Bytes that are not UTF-8 reach the record as lone surrogates, which the document checks
    reject for that record alone, instead of ending the whole read."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, Rejected(f"line {lineno}", f"invalid JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                yield lineno, Rejected(f"line {lineno}", "record is not a JSON object")
                continue
            yield lineno, rec


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return sum(1 for line in f if line.strip())


class JsonlCorpus:
    """One object per line: {"id", "text", "image" (path relative to the file), "metadata"}."""

    kind = "jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __iter__(self) -> Iterator[Item | Rejected]:
        base = str(self.path.parent)  # joined by os.path: pathlib cost more than the rest of reading a line
        for lineno, rec in _json_objects(self.path):
            if isinstance(rec, Rejected):
                yield rec
                continue
            doc_id = rec.get("id")
            if doc_id is None or str(doc_id).strip() == "":
                yield Rejected(f"line {lineno}", "missing id")
                continue
            doc_id = str(doc_id)
            modality = rec.get("modality")
            if modality is not None and modality not in MODALITIES:
                yield Rejected(doc_id, f"unknown modality {modality!r} (use image, text or image,text)")
                continue
            meta = rec.get("metadata") or {}
            if not isinstance(meta, dict):
                yield Rejected(doc_id, "metadata must be a JSON object")
                continue
            image = rec.get("image")
            if image is not None and not isinstance(image, str):
                yield Rejected(doc_id, "image must be a path string")
                continue
            item = Item(doc_id, rec.get("text"), os.path.join(base, image) if image else None, meta)
            problem = _problem(item)
            if problem is None and modality is not None and modality != item.modality:
                problem = f"modality says {modality!r} but the record holds {item.modality!r}"
            yield Rejected(doc_id, problem) if problem else item

    def __len__(self) -> int:
        return _count_lines(self.path)


class FolderCorpus:
    """Images found recursively; `name.txt` beside `name.jpg` is its caption.

    The id is the path relative to the folder. A .txt with no image beside it is a text item.
    """

    kind = "folder"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))

    def __iter__(self) -> Iterator[Item | Rejected]:
        files = self._files()
        images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
        for p in files:
            rel = p.relative_to(self.path).as_posix()
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                cap = p.with_suffix(".txt")
                text = None
                if cap.exists():
                    try:
                        text = cap.read_text(encoding="utf-8").strip() or None
                    except UnicodeDecodeError:
                        yield Rejected(rel, f"caption {cap.name} is not UTF-8 text")
                        continue
                item = Item(rel, text, str(p), {"path": rel})
                problem = _problem(item)
                yield Rejected(rel, problem) if problem else item
            elif p.suffix.lower() == ".txt" and p.with_suffix("") not in images:
                try:
                    text = p.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    yield Rejected(rel, "not UTF-8 text")
                    continue
                item = Item(rel, text.strip(), None, {"path": rel})
                problem = _problem(item)
                yield Rejected(rel, problem) if problem else item

    def __len__(self) -> int:
        files = self._files()
        images = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
        return sum(1 for p in files if p.suffix.lower() in IMAGE_EXTENSIONS
                   or (p.suffix.lower() == ".txt" and p.with_suffix("") not in images))


def mbeir_image_root(path: Path) -> Path:
    """M-BEIR image paths are relative to the data set folder, above the mbeir/ folder."""
    for parent in path.resolve().parents:
        if parent.name == "mbeir":
            return parent.parent
    return path.resolve().parent


class MbeirPoolCorpus:
    """An M-BEIR candidate pool: {"did", "txt", "img_path", "modality"} per line."""

    kind = "mbeir"

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root else mbeir_image_root(self.path)

    def __iter__(self) -> Iterator[Item | Rejected]:
        for lineno, rec in _json_objects(self.path):
            if isinstance(rec, Rejected):
                yield rec
                continue
            did = rec.get("did")
            if not did:
                yield Rejected(f"line {lineno}", "missing did")
                continue
            modality = rec.get("modality")
            if modality not in MODALITIES:
                yield Rejected(did, f"unknown modality {modality!r}")
                continue
            img = rec.get("img_path")
            item = Item(str(did), rec.get("txt"), str(self.image_root / img) if img else None,
                        {k: rec[k] for k in ("src_content",) if rec.get(k) is not None})
            problem = _problem(item)
            if problem is None and item.modality != modality:
                problem = f"modality says {modality!r} but the record holds {item.modality!r}"
            yield Rejected(did, problem) if problem else item

    def __len__(self) -> int:
        return _count_lines(self.path)


def open_corpus(path: str | Path, kind: str = "auto"):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    if kind == "auto":
        if path.is_dir():
            kind = "folder"
        elif path.name.endswith("_cand_pool.jsonl"):
            kind = "mbeir"
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8", errors="replace") as f:
                first = next((line for line in f if line.strip()), "")
            kind = "mbeir" if '"did"' in first else "jsonl"
        else:
            raise InvalidArgument(f"cannot tell the format of {path}: use a .jsonl file, an M-BEIR pool or a folder (or --format)")
    readers = {"jsonl": JsonlCorpus, "folder": FolderCorpus, "mbeir": MbeirPoolCorpus}
    if kind not in readers:
        raise InvalidArgument(f"unknown corpus format {kind!r}: use jsonl, folder or mbeir")
    return readers[kind](path)
