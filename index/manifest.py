"""The index manifest: the JSON file that makes an index directory self-describing."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from umr.index import layout
from umr.index.atomic import atomic_write_json
from umr.index.errors import IndexError_, NotFound

FORMAT = "umr-index"
FORMAT_VERSION = 1


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_manifest(encoder: dict, index_request: dict) -> dict:
    """`encoder` is the index-space encoder's record: spec, fingerprint, dim, description.

    It becomes encoder version 1; `umr update` registers later versions, each query encoder
    reaching older segments through the compensators recorded on those segments.
    """
    encoder = {**encoder, "version": 1}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": now(),
        "updated": now(),
        "state": "building",
        "docstore_id": uuid.uuid4().hex,  # also in docs.sqlite: the two belong together (index/integrity.py)
        "encoder": encoder,
        "index_request": index_request,
        "segments": [{"id": 0, "encoder": encoder, "index": None, "faiss_file": None, "created": now()}],
        "encoders": [encoder],
        "active_version": 1,
        "build": {},
        "history": [{"time": now(), "event": "created", "encoder": encoder.get("fingerprint")}],
    }


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / layout.MANIFEST
    if not path.exists():
        raise NotFound(f"{directory} is not a umr index (no {layout.MANIFEST}); build one with `umr index build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IndexError_(f"{path} is not valid JSON ({e}); the index directory is damaged") from None
    if manifest.get("format") != FORMAT:
        raise IndexError_(f"{path} is not a umr index manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise IndexError_(
            f"{directory} has index format {manifest['format_version']}, newer than this umr reads "
            f"({FORMAT_VERSION}); upgrade umr"
        )
    return manifest


def write_manifest(directory: str | Path, manifest: dict) -> None:
    manifest["updated"] = now()
    atomic_write_json(Path(directory) / layout.MANIFEST, manifest)


def same_manifest(a: dict | None, b: dict) -> bool:
    """Equal as written to disk (JSON), its `updated` time aside."""
    def as_written(m: dict) -> str:
        return json.dumps({k: v for k, v in m.items() if k != "updated"}, sort_keys=True)
    return a is not None and as_written(a) == as_written(b)
