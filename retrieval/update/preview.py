"""`umr update --eval-docs CORPUS`: what an update costs and buys once the documents that
motivated it are in the index, measured before anything is written.

An update is usually made for documents that are not indexed yet (a new catalogue). Whether
it pays depends on them: after it they go into a new segment embedded by the new encoder,
without it they are embedded by the old one, and either way they compete with the old
documents for the old queries (docs/benchmarks.md, section continual). Both futures are built
on temporary copies of the index, searched as umr searches them, and scored on the --eval and
--eval-new queries; the index itself is only read.
"""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from umr.index.layout import DOCSTORE
from umr.index.store import IndexStore
from umr.retrieval.encoders import Encoder, load_recorded
from umr.retrieval.engine import Engine, Query
from umr.retrieval.indexing.pipeline import add_to_index
from umr.retrieval.update.judged import read_eval_queries


def copy_index(src: Path, dst: Path) -> Path:
    """A consistent copy: files as they are, the document store through SQLite's backup."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"{DOCSTORE}*"))
    with sqlite3.connect(str(src / DOCSTORE)) as a, sqlite3.connect(str(dst / DOCSTORE)) as b:
        a.backup(b)
    return dst


def _recall(engine: Engine, path: str, k: int) -> float:
    items, relevant = read_eval_queries(path)
    hits = engine.search([Query(it.text, it.image) for it in items], k=k)
    return float(np.mean([any(h.id in rel for h in hs) for hs, rel in zip(hits, relevant)]))


def preview(store: IndexStore, new: Encoder, apply_update: Callable[[IndexStore], None], corpus: str,
            queries: dict[str, str], k: int = 5) -> dict:
    """Hit rate@k per query file (label -> path) with `corpus` added, without and with the update."""
    old = load_recorded(store.version(store.active_version))
    out = {"documents": str(corpus), f"hit_rate@{k}": {}}
    with tempfile.TemporaryDirectory(prefix="umr-update-preview-") as tmp:
        for label, encoder, update in (("keep the old encoder", old, False), ("update", new, True)):
            copy = IndexStore.open(copy_index(store.path, Path(tmp) / label.replace(" ", "-")))
            try:
                if update:
                    apply_update(copy)
                added = add_to_index(copy, encoder, corpus, progress=False)
            finally:
                copy.close()
            out["added"] = added.indexed
            engine = Engine.open(Path(tmp) / label.replace(" ", "-"))
            try:
                out[f"hit_rate@{k}"][label] = {name: _recall(engine, path, k) for name, path in queries.items()}
            finally:
                engine.close()
    return out
