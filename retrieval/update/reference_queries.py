"""The reference queries of an encoder version: a fixed population, in that version's space,
that the scales merging older segments (index/version_scale.py) are fitted with, in both spaces.

Written by `umr update` beside the version it registers (index/layout.py names the file; the
version's record names it with its checksum): for text, umr's generic queries, which belong to no segment's
domain; for images and image+text, the calibration queries the update embedded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from umr.index import layout, side_files
from umr.index.store import IndexStore
from umr.retrieval.encoders import Encoder
from umr.retrieval.update.generic_queries import generic_queries

TEXTS = 2000
PER_MODALITY = 2000


def _key(modality: str) -> str:
    return modality.replace(",", "+")


def write_references(store: IndexStore, version: int, new: Encoder, queries: dict[str, list[np.ndarray]],
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Save the references of `version` (and return them, query modality -> rows): generic texts
    embedded by `new`, and up to PER_MODALITY of the given query rows (already in its space)
    per other modality."""
    rng = np.random.default_rng(seed)
    arrays = {}
    if new.supports_texts:
        arrays["text"] = new.encode_texts(list(generic_queries(TEXTS)))
    for modality, parts in queries.items():
        if modality == "text" or not parts:
            continue
        rows = np.concatenate(parts)
        if len(rows) > PER_MODALITY:
            rows = rows[np.sort(rng.choice(len(rows), PER_MODALITY, replace=False))]
        arrays[_key(modality)] = np.ascontiguousarray(rows, dtype=np.float32)
    record = side_files.write_recorded(store.path, layout.reference_file(version), lambda tmp: save_file(arrays, tmp))
    store.set_reference(version, {**record, "queries": {k.replace("+", ","): int(len(v)) for k, v in arrays.items()}})
    return {k.replace("+", ","): v for k, v in arrays.items()}


def read_references(store: IndexStore, version: int) -> dict[str, np.ndarray]:
    rec = store.version(version).get("reference")
    if not rec:
        return {}
    side_files.check_reference(store.path, version, rec)
    return {k.replace("+", ","): v for k, v in load_file(str(Path(store.path) / rec["file"])).items()}
