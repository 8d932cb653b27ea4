"""Every file of an index directory, named in one place.

    manifest.json                            what built it, index choice per segment, encoder
                                             versions, compensators, history
    docs.sqlite (-wal, -shm)                 documents, row states, tombstones, build cursor
    docs.sqlite-commits                      the writer's commit count (index/commit_mark.py)
    write.lock, manifest.lock                the writer's and the manifest's locks (index/locks.py)
    segments/<id>/vectors.<epoch>.<f32|f16>  the segment's exact vectors (index/vector_file.py)
    segments/<id>/index.<token>.faiss        the FAISS checkpoint the manifest names
    segments/<id>/compensators/v<N>-<modality>.json, .safetensors
                                             how version N's queries reach the segment
    calibration/v<N>-reference.safetensors   version N's reference queries (score scales)
    images/<sha256[:32]>.img                 images uploaded with documents (over HTTP, the API)
    ray-shards/                              a `--ray` build's encoded shards, until merged

Every file is replaced atomically (index/atomic.py), except the document store (SQLite
transactions) and the vector files (append-only, checksummed per block). The manifest records a
checksum for each file it names and an upload is named by its hash, so `umr index verify`
checks all of them (index/side_files.py for the compensators, references and uploads). Paths are relative to the index directory, as the
manifest and the document store record them, so an index can be moved whole.
"""
from __future__ import annotations

import re
import uuid

MANIFEST = "manifest.json"
DOCSTORE = "docs.sqlite"
COMMIT_MARK_SUFFIX = "-commits"  # beside the document store, as SQLite's own -wal and -shm are
WRITE_LOCK = "write.lock"
MANIFEST_LOCK = "manifest.lock"
SEGMENTS = "segments"
UPLOADS = "images"
CALIBRATION = "calibration"
RAY_SHARDS = "ray-shards"
UPLOAD_NAME = re.compile(rf"^{UPLOADS}/([0-9a-f]{{32}})\.img$")


def segment_dir(seg_id: int) -> str:
    return f"{SEGMENTS}/{seg_id}"


def first_checkpoint(seg_id: int) -> str:
    """The name a segment's record carries before its first checkpoint is written."""
    return f"{segment_dir(seg_id)}/index.faiss"


def new_checkpoint(seg_id: int) -> str:
    """A new name per checkpoint: the manifest names the new file only once it is complete."""
    return f"{segment_dir(seg_id)}/index.{uuid.uuid4().hex[:12]}.faiss"


def compensator_dir(seg_id: int) -> str:
    return f"{segment_dir(seg_id)}/compensators"


def compensator_name(version: int, modality: str) -> str:
    return f"v{version}-{modality.replace(',', '+')}"


def reference_file(version: int) -> str:
    return f"{CALIBRATION}/v{version}-reference.safetensors"


def upload(digest: str) -> str:
    """An uploaded image, named by (the first 32 hex digits of) its SHA-256: verify can tell a
    damaged one from its name alone."""
    return f"{UPLOADS}/{digest[:32]}.img"
