"""The index's files beside its segments: compensators, reference queries and uploaded images.

Each is written atomically and recorded with its SHA-256 (an upload is named by it), so a
file damaged or lost after it was written is refused where it is read, with what to do, and
found by `umr index verify` (index/verify.py), instead of changing answers silently."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable, Iterator

from umr.index import layout
from umr.index.atomic import atomic_write, atomic_write_bytes, file_sha256
from umr.index.errors import IndexDamaged

UPLOAD_SAMPLE = 1000  # uploads hashed by a verify without --full


def write_recorded(index_dir: Path, rel: str, write: Callable[[str], None]) -> dict:
    """Write `rel` atomically through `write(tmp_path)`; the record the manifest keeps of it."""
    path = Path(index_dir) / rel
    atomic_write(path, write)
    return {"file": rel, **_sums(path)}


def checksums(directory: Path, names) -> dict[str, dict]:
    """name -> {bytes, sha256} of files just written in `directory`."""
    return {n: _sums(Path(directory) / n) for n in names}


def _sums(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def problem(index_dir: Path, record: dict) -> str | None:
    """Why the recorded file cannot be trusted, or None (also for records made before checksums)."""
    path = Path(index_dir) / record["file"]
    if "sha256" not in record:
        return None if path.exists() else f"{record['file']} is missing"
    if not path.exists():
        return f"{record['file']} is missing"
    if path.stat().st_size != record["bytes"]:
        return f"{record['file']} holds {path.stat().st_size} bytes, {record['bytes']} were written"
    if file_sha256(path) != record["sha256"]:
        return f"{record['file']} does not match its checksum"
    return None


def check_reference(index_dir: Path, version: int, record: dict) -> None:
    """Refuse version `version`'s damaged reference queries where they are about to be read."""
    _check(index_dir, record, *_reference_words(index_dir, version))


def check_compensator(index_dir: Path, seg_id: int, version: int | str, modality: str, comp: dict) -> None:
    """Refuse a damaged compensator (any of its files) where it is about to be loaded."""
    for record in compensator_files(comp):
        _check(index_dir, record, *_compensator_words(index_dir, seg_id, version, modality))


def _check(index_dir: Path, record: dict, what: str, fix: str) -> None:
    found = problem(index_dir, record)
    if found:
        raise IndexDamaged(f"{what}: {found}; {fix} (`umr index verify {index_dir}` lists what else is damaged)")


def _reference_words(index_dir: Path, version: int | str) -> tuple[str, str]:
    return (f"encoder version {version}'s reference queries",
            f"`umr update {index_dir} --to {version} --no-activate` writes them again")


def _compensator_words(index_dir: Path, seg_id: int, version: int | str, modality: str) -> tuple[str, str]:
    return (f"segment {seg_id}'s compensator for version {version}'s {modality} queries",
            f"`umr update {index_dir} --to {version} --no-activate` fits it again")


def keep_upload(index_dir: Path, data: bytes) -> str:
    """Uploaded image bytes kept inside the index, named by their hash (written once)."""
    rel = layout.upload(hashlib.sha256(data).hexdigest())
    path = Path(index_dir) / rel
    if not path.exists():
        atomic_write_bytes(path, data)
    return rel


def upload_problems(index_dir: Path, full: bool, sample: int = UPLOAD_SAMPLE, seed: int = 0) -> tuple[int, list[str]]:
    """(uploads hashed, what is wrong with them): each upload's bytes against its name."""
    files = sorted((Path(index_dir) / layout.UPLOADS).glob("*.img"))
    if not full and len(files) > sample:
        files = random.Random(seed).sample(files, sample)
    bad = []
    for path in files:
        if file_sha256(path)[:32] != path.stem:
            bad.append(f"{layout.UPLOADS}/{path.name} does not match the hash it is named by (damaged after upload)")
    return len(files), bad


def missing_uploads(index_dir: Path, raw_docs) -> list[tuple[str, str]]:
    """(id, image) of the documents among `raw_docs` (DocStore.raw_docs rows) whose uploaded
    image is not in the index."""
    return [(bytes(d[0]).decode("utf-8", "backslashreplace"), d[3]) for d in raw_docs
            if d[3] and layout.UPLOAD_NAME.match(d[3]) and not (Path(index_dir) / d[3]).exists()]


def recorded_files(manifest: dict, index_dir: Path) -> Iterator[tuple[str, dict, str]]:
    """(what it is, its record, how to write it again) for every side file the manifest names."""
    for rec in manifest.get("encoders", []):
        if rec.get("reference"):
            what, fix = _reference_words(index_dir, rec["version"])
            yield what, rec["reference"], fix
    for seg in manifest.get("segments", []):
        for version, by_modality in seg.get("compensators", {}).items():
            for modality, comp in by_modality.items():
                what, fix = _compensator_words(index_dir, seg["id"], version, modality)
                for record in compensator_files(comp):
                    yield what, record, fix


def compensator_files(comp: dict) -> list[dict]:
    """The file records of one compensator's manifest entry (its parameters, and arrays if any)."""
    sums = comp.get("checksums", {})
    return [{"file": f"{comp['dir']}/{name}", **sums.get(name, {})} for name in comp.get("files", {}).values()]
