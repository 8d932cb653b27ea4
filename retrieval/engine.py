"""The engine: one encoder and one index behind search / add / delete / get.

Searches and writes from the CLI, the HTTP server and Python users go through this object;
the server adds only transport, batching and policy. Maintenance works on the IndexStore
directly: the CLI's index info/verify/tune/compact and update commands, the builds
(retrieval/indexing/pipeline.py), and the server's follower when it reopens the index.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umr.index import side_files
from umr.index import version_scale as vs
from umr.index.documents import DocRecord
from umr.index.errors import IndexMismatch, InvalidArgument
from umr.index.search_plan import SearchHit, SearchPlan
from umr.index.store import IndexStore
from umr.retrieval.encoders import Encoder, load_encoder, load_recorded
from umr.retrieval.encoders.base import Prepared
from umr.retrieval.images import DEFAULT_LIMITS, ImageLimits, open_image
from umr.retrieval.items import Item, stored_item
from umr.retrieval.update.reference_queries import read_references

log = logging.getLogger("umr.retrieval")


@dataclass
class Query:
    text: str | None = None
    image: object = None  # path, bytes or PIL image
    instruction: str | None = None

    def item(self) -> Item:
        return Item(None, self.text, self.image)


class CompensationMissing(IndexMismatch):
    """A query modality has no compensator into an older segment; never served with another's."""


def query_modality(p: Prepared) -> str:
    return "image,text" if p.image is not None and p.text is not None else ("image" if p.image is not None else "text")


class Engine:
    def __init__(self, store: IndexStore, encoder: Encoder):
        version = store.version_of_fingerprint(encoder.fingerprint)
        if version is None:
            active = store.version(store.active_version)
            raise IndexMismatch(
                f"the index at {store.path} was built with encoder {store.encoder['spec']} "
                f"(fingerprint {store.encoder['fingerprint']}) and its active query encoder is {active['spec']} "
                f"({active['fingerprint']}), but {encoder.spec} has fingerprint {encoder.fingerprint}. "
                f"Search it with --encoder {active['spec']} (the default), or register the new encoder with "
                f"`umr update {store.path} --encoder {encoder.spec}`."
            )
        self.store = store
        self.encoder = encoder
        self.version = version
        # Calibrated scores unless a request asks for raw cosines: older segments' scores on the
        # active encoder's scale (index/version_scale.py) and documents of several modalities
        # merged by calibrated score (index/modality_calibration.py).
        self.calibrated = True
        self.write_lock = threading.Lock()
        self.timings = {"encode_s": 0.0, "search_s": 0.0, "compensate_s": 0.0, "rerank_s": 0.0}
        self.reranker = None
        self.scales: dict[int, dict[str, dict[str, list[float]]]] = {}
        self._scale_lock = threading.Lock()
        self.compensators = self._load_compensators()
        self._references: dict[str, np.ndarray] | None = None

    def _load_compensators(self) -> dict[int, dict]:
        """{segment id: {query modality: compensator}} for segments built by another version."""
        from umr.retrieval.update.compensators import Compensator

        out: dict[int, dict] = {}
        for seg in self.store.segments:
            if seg.record["encoder"].get("version", 1) == self.version:
                continue
            recs = seg.record.get("compensators", {}).get(str(self.version), {})
            for m, r in recs.items():
                side_files.check_compensator(self.store.path, seg.id, self.version, m, r)
            out[seg.id] = {m: Compensator.load(self.store.path / r["dir"], r["name"]) for m, r in recs.items()}
            self.scales[seg.id] = {m: r["scales"] for m, r in recs.items() if r.get("scales")}
        return out

    def score_maps(self, query_modalities: list[str], modalities: list[str] | None) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        """Per compensated segment, each query's (scale, offset) onto the active encoder's
        cosines (index/version_scale.py), fitted on first use where `umr update` did not."""
        if not self.compensators:
            return None
        self._fit_missing_scales()
        out = {}
        for seg in self.store.segments:
            comps = self.compensators.get(seg.id)
            if comps is None or not seg.alive.any():  # an empty segment is not searched
                continue
            key = vs.doc_key(modalities, self.store.calibrations.present_modalities(seg))
            pairs = []
            for m in query_modalities:
                by_key = self.scales.get(seg.id, {}).get(m, {})
                pair = by_key.get(key) or by_key.get(vs.ALL)
                if not vs.valid(pair):
                    raise CompensationMissing(
                        f"segment {seg.id} has no score scale for {m} queries of encoder version {self.version} "
                        f"(none of its documents could be embedded again to fit one); search with calibration off "
                        f"(--no-calibration, \"calibrated\": false) to get raw cosines")
                pairs.append(pair)
            out[seg.id] = (np.array([p[0] for p in pairs], np.float32), np.array([p[1] for p in pairs], np.float32))
        return out

    def _fit_missing_scales(self) -> None:
        """Scales for segments compensated before `umr update` fitted them: the sample of their
        documents is embedded by this engine's (the active) encoder once, then kept in the
        manifest (written with the next checkpoint where the index is writable)."""
        def lacking():
            return [seg for seg in self.store.segments if seg.id in self.compensators and seg.alive.any()
                    and not set(self.compensators[seg.id]) <= set(self.scales.get(seg.id, {}))]

        if not lacking():
            return
        from umr.retrieval.update.version_scales import fit_segment

        with self._scale_lock:
            todo = lacking()  # another request may have fitted them meanwhile
            for seg in todo:
                fitted = fit_segment(self.store, seg, self.encoder, self.compensators[seg.id], self.references())
                for m in self.compensators[seg.id]:
                    by_key = fitted.get(m, {})
                    rec = seg.record.get("compensators", {}).get(str(self.version), {}).get(m)
                    if rec is not None and by_key:
                        rec["scales"] = by_key
                    self.scales.setdefault(seg.id, {})[m] = by_key
            if todo and self.store.mode == "read":
                # A read-only process (`umr search`, a replica) writes no checkpoint: keep them the
                # way `umr update --no-activate` keeps what it registers, so the next start has them.
                try:
                    self.store.save_registrations()
                except OSError as e:
                    log.warning("could not keep the fitted score scales in %s: %s", self.store.path, e)

    def references(self) -> dict[str, np.ndarray]:
        """The active version's reference queries (query modality -> rows in its space) that
        `umr update` wrote; empty for a version registered without."""
        if self._references is None:
            self._references = read_references(self.store, self.version)
        return self._references

    def map_queries(self, vectors: np.ndarray, modalities: list[str]) -> np.ndarray | dict[int, np.ndarray]:
        """The query vectors each segment is searched with: as encoded for the active
        version's segments, through that segment's compensator for older ones."""
        if not self.compensators:
            return vectors
        t0 = time.perf_counter()
        out: dict[int, np.ndarray] = {}
        mods = np.array(modalities)
        for seg in self.store.segments:
            comps = self.compensators.get(seg.id)
            if comps is None:
                out[seg.id] = vectors
                continue
            if not seg.alive.any():  # not searched (a version's segment left empty when another was activated)
                continue
            mapped = np.zeros((len(vectors), seg.dim), dtype=np.float32)
            for m in set(modalities):
                if m not in comps:
                    v = seg.record["encoder"].get("version", 1)
                    raise CompensationMissing(
                        f"no compensator maps {m} queries of encoder version {self.version} into segment {seg.id} "
                        f"(version {v}); run `umr update` with {m} calibration data"
                    )
                rows = np.flatnonzero(mods == m)
                mapped[rows] = comps[m].apply(vectors[rows])
            out[seg.id] = mapped
        self.timings["compensate_s"] += time.perf_counter() - t0
        return out

    @classmethod
    def open(cls, path: str | Path, encoder: str | Encoder | None = None, mode: str = "write") -> "Engine":
        """`mode` "read" searches without the index's write lock (and refuses writes)."""
        store = IndexStore.open(path, mode)
        try:
            if encoder is None:
                encoder = load_recorded(store.version(store.active_version))
            elif isinstance(encoder, str):
                encoder = load_encoder(encoder)
            return cls(store, encoder)
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
                       flt: dict | None = None, query_modalities: list[str] | None = None,
                       calibrated: bool | None = None) -> list[list[SearchHit]]:
        """`query_modalities` (one per row) picks each row's compensator into older segments
        and its modality calibration; `calibrated=False` keeps raw cosines."""
        query_modalities = query_modalities or ["text"] * len(vectors)
        queries = self.map_queries(vectors, query_modalities)
        calibrated = self.calibrated if calibrated is None else calibrated
        maps = self.score_maps(query_modalities, modalities) if calibrated else None
        t0 = time.perf_counter()
        plan = SearchPlan(queries, k, modalities, flt, score_maps=maps, query_modalities=query_modalities,
                          calibrated=calibrated)
        hits = self.store.search(plan)
        self.timings["search_s"] += time.perf_counter() - t0
        return hits

    def search(self, queries: list[Query], k: int = 10, modalities: list[str] | None = None,
               flt: dict | None = None, calibrated: bool | None = None) -> list[list[SearchHit]]:
        prepared = [self.prepare_query(q) for q in queries]
        return self.search_prepared(prepared, self.embed(prepared), k, modalities, flt, calibrated)

    def use_reranker(self, reranker, depth: int, weight: float = 1.0) -> None:
        """Retrieve `depth` candidates, re-rank them with cos + weight * P(yes)."""
        # The query's image reaches the re-ranker as the encoder prepared it.
        if not reranker.accepts(self.encoder):
            raise InvalidArgument(f"a {reranker.kind} re-ranker {reranker.needs}; this index queries with {self.encoder.spec}")
        if depth < 1:
            raise InvalidArgument("--rerank takes the number of candidates to re-rank (at least 1)")
        self.reranker, self.rerank_depth, self.rerank_weight = reranker, depth, weight

    def search_prepared(self, prepared: list[Prepared], vectors: np.ndarray, k: int, modalities: list[str] | None = None,
                        flt: dict | None = None, calibrated: bool | None = None) -> list[list[SearchHit]]:
        reranker = self.reranker
        depth = max(k, self.rerank_depth) if reranker else k
        hits = self.search_vectors(vectors, depth, modalities, flt, [query_modality(p) for p in prepared], calibrated)
        if not reranker:
            return hits
        from umr.retrieval.rerank.reranker import rerank

        t0 = time.perf_counter()
        out = [rerank(reranker, Item(None, p.text, p.image), h, self.rerank_depth, self.rerank_weight, k,
                      lambda doc: stored_item(self.store.path, doc))
               for p, h in zip(prepared, hits)]
        self.timings["rerank_s"] += time.perf_counter() - t0
        return out


    # -- documents ------------------------------------------------------------------------
    def add(self, items: list[Item], limits: ImageLimits = DEFAULT_LIMITS) -> list[str]:
        """Encode and store; durable on return. Raises before storing anything if an item is bad."""
        if self.version != self.store.active_version:
            raise IndexMismatch(
                f"documents are embedded by the active encoder (version {self.store.active_version}); "
                f"this engine queries with version {self.version}"
            )
        for it in items:
            if not it.id:
                raise InvalidArgument("every document needs an id")
        prepared = [self.encoder.prepare(it, "document", limits=limits) for it in items]
        vectors = self.embed(prepared)
        docs = []
        for it in items:
            ref = side_files.keep_upload(self.store.path, bytes(it.image)) if isinstance(it.image, (bytes, bytearray)) else it.image_ref()
            docs.append(DocRecord(it.id, it.modality, it.text, ref, it.metadata))
        with self.write_lock:
            # An encoder swap may have activated another version while these were embedded:
            # their vectors must not land in that version's segment.
            if self.version != self.store.active_version:
                raise IndexMismatch(f"encoder version {self.store.active_version} was activated while these "
                                    f"documents were embedded by version {self.version}; send them again")
            self.store.add(docs, vectors)
        return [d.id for d in docs]

    def delete(self, ids: list[str]) -> list[str]:
        with self.write_lock:
            return self.store.delete(ids)

    def get(self, doc_id: str) -> DocRecord:
        return self.store.get(doc_id)

    def image_path(self, doc: DocRecord) -> Path | None:
        """Where a document's stored image is on this machine (uploads live inside the index)."""
        ref = stored_item(self.store.path, doc).image
        return Path(ref) if ref else None

    def checkpoint(self) -> None:
        with self.write_lock:
            self.store.save()

    def info(self) -> dict:
        out = self.store.info()
        out["query_encoder"] = {"spec": self.encoder.spec, "fingerprint": self.encoder.fingerprint, "version": self.version,
                                "compensators": {str(seg_id): {m: c.kind for m, c in comps.items()}
                                                 for seg_id, comps in self.compensators.items()}}
        # Clients (the search page) say when scores are cos + w * P(yes) rather than cosines.
        out["reranker"] = None if self.reranker is None else {
            "kind": self.reranker.kind, "path": self.reranker.path, "depth": self.rerank_depth, "weight": self.rerank_weight}
        return out
