"""What `umr index info` and `GET /v1/index` report about an open store."""
from __future__ import annotations

from typing import TYPE_CHECKING

from umr.index import gpu
from umr.index.documents import CODE_MODALITIES

if TYPE_CHECKING:
    from umr.index.segment import Segment
    from umr.index.store import IndexStore


def describe(store: "IndexStore") -> dict:
    with store.lock:
        return {
            "path": str(store.path),
            "state": store.manifest["state"],
            "format_version": store.manifest["format_version"],
            "encoder": store.version(store.active_version),  # the one queries are embedded with
            "built_with": store.manifest["encoder"],
            "documents": store.count(),
            "vectors": {"stored_in": store.docs.vectors.kind, "dtype": store.docs.vectors.dtype},
            "segments": [_segment(store, seg) for seg in store.segments],
            "search": gpu.describe(),
            "encoders": store.versions,
            "active_version": store.active_version,
            "build": store.manifest.get("build", {}),
            "created": store.manifest["created"],
            "updated": store.manifest["updated"],
        }


def _segment(store: "IndexStore", seg: "Segment") -> dict:
    counts = {CODE_MODALITIES[c]: int(((seg.codes == c) & seg.alive).sum()) for c in CODE_MODALITIES}
    return {
        "id": seg.id,
        "encoder_version": seg.record["encoder"].get("version", 1),
        "encoder": seg.record["encoder"],
        "compensators": seg.record.get("compensators", {}),
        "index": seg.record.get("index"),
        "documents": int(seg.alive.sum()),
        "deleted_rows": int((~seg.alive).sum()),
        "by_modality": {m: c for m, c in counts.items() if c},
        "modality_calibration": store.calibrations.pairs(seg),
        "vectors_in_faiss": int(seg.faiss.ntotal) if seg.faiss is not None else 0,
        "search_runs_on": gpu.where_search_runs(seg.choice.kind, seg.gpu) if seg.choice is not None else None,
    }
