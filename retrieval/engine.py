"""The engine: one encoder and one index behind search / add / delete / get.

The CLI, the HTTP server and Python users all call this object; the server adds only
transport, batching and policy.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.docstore import DocRecord
from index.errors import IndexMismatch
from index.store import IndexStore, SearchHit
from retrieval.encoders import Encoder, load_encoder
from retrieval.encoders.base import Prepared
from retrieval.images import DEFAULT_LIMITS, ImageLimits, open_image
from retrieval.items import Item

UPLOADS = "images"


@dataclass
class Query:
    text: str | None = None
    image: object = None  # path, bytes or PIL image
    instruction: str | None = None

    def item(self) -> Item:
        return Item(None, self.text, self.image)


class Engine:
    def __init__(self, store: IndexStore, encoder: Encoder):
        if encoder.fingerprint != store.encoder["fingerprint"]:
            raise IndexMismatch(
                f"the index at {store.path} was built with encoder {store.encoder['spec']} "
                f"(fingerprint {store.encoder['fingerprint']}), but {encoder.spec} has fingerprint "
                f"{encoder.fingerprint}. Search it with --encoder {store.encoder['spec']} (the default), "
                "or rebuild the index with the new encoder."
            )
        self.store = store
        self.encoder = encoder
        self.write_lock = threading.Lock()
        self.timings = {"encode_s": 0.0, "search_s": 0.0}

    @classmethod
    def open(cls, path: str | Path, encoder: str | Encoder | None = None) -> "Engine":
        store = IndexStore.open(path)
        if encoder is None:
            encoder = store.encoder["spec"]
        enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
        try:
            return cls(store, enc)
        except Exception:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    # -- queries --------------------------------------------------------------------------
    def prepare_query(self, q: Query, limits: ImageLimits = DEFAULT_LIMITS) -> Prepared:
        item = q.item()
        if item.image is not None:
            item.image = open_image(item.image, limits, min_side=self.encoder.image_size)
        return self.encoder.prepare(item, role="query", instruction=q.instruction, limits=limits)

    def embed(self, prepared: list[Prepared]) -> np.ndarray:
        t0 = time.perf_counter()
        v = self.encoder.embed(prepared)
        self.timings["encode_s"] += time.perf_counter() - t0
        return v

    def search_vectors(self, vectors: np.ndarray, k: int = 10, modalities: list[str] | None = None,
                       flt: dict | None = None) -> list[list[SearchHit]]:
        t0 = time.perf_counter()
        hits = self.store.search(vectors, k, modalities, flt)
        self.timings["search_s"] += time.perf_counter() - t0
        return hits

    def search(self, queries: list[Query], k: int = 10, modalities: list[str] | None = None,
               flt: dict | None = None) -> list[list[SearchHit]]:
        vectors = self.embed([self.prepare_query(q) for q in queries])
        return self.search_vectors(vectors, k, modalities, flt)

    # -- documents ------------------------------------------------------------------------
    def _keep_image(self, data: bytes) -> str:
        """Uploaded image bytes are kept inside the index, named by content hash."""
        digest = hashlib.sha256(data).hexdigest()[:32]
        path = self.store.path / UPLOADS / f"{digest}.img"
        if not path.exists():
            from index.atomic import atomic_write_bytes

            atomic_write_bytes(path, data)
        return f"{UPLOADS}/{digest}.img"

    def add(self, items: list[Item], limits: ImageLimits = DEFAULT_LIMITS) -> list[str]:
        """Encode and store; durable on return. Raises before storing anything if an item is bad."""
        for it in items:
            if not it.id:
                raise ValueError("every document needs an id")
        prepared = [self.encoder.prepare(it, "document", limits=limits) for it in items]
        vectors = self.embed(prepared)
        docs = []
        for it in items:
            ref = self._keep_image(bytes(it.image)) if isinstance(it.image, (bytes, bytearray)) else it.image_ref()
            docs.append(DocRecord(it.id, it.modality, it.text, ref, it.metadata))
        with self.write_lock:
            self.store.add(docs, vectors)
        return [d.id for d in docs]

    def delete(self, ids: list[str]) -> list[str]:
        with self.write_lock:
            return self.store.delete(ids)

    def get(self, doc_id: str) -> DocRecord:
        return self.store.get(doc_id)

    def checkpoint(self) -> None:
        with self.write_lock:
            self.store.save()

    def info(self) -> dict:
        out = self.store.info()
        out["query_encoder"] = {"spec": self.encoder.spec, "fingerprint": self.encoder.fingerprint}
        return out
