"""umr as a library: `umr.Index` and `umr.load_encoder`, over the same engine the CLI and the
server call, so an index built here is served by `umr serve` and the other way round.

Typed at the edge (Hit, Document), plain values inside. Errors are the engine's own
(umr.index.errors), with a message that says what to do; see Index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import Encoder
from umr.retrieval.encoders import load_encoder as _load_encoder
from umr.retrieval.engine import Engine, Query
from umr.retrieval.items import Item, parse_modalities

DEFAULT_ENCODER = "lit-base"


@dataclass(frozen=True)
class Document:
    id: str
    modality: str  # "image", "text" or "image,text"
    text: str | None = None
    image: Path | None = None  # where the stored image lies (inside the index for uploaded bytes)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit(Document):
    """One search result: the stored document and how it ranked.

    Attributes:
        score: what the ranking used. A raw cosine when one encoder version and one document
            modality are searched (or with `calibrated=False`); otherwise calibrated: in [0, 1]
            across modalities, the active encoder's cosine across encoder versions; a re-ranker's
            score when one is installed.
        cosine: the raw cosine behind a calibrated or re-ranked score, None when `score` is it.
        rerank: {"cosine", "p_yes"} behind a re-ranked score, else None.
    """

    score: float = 0.0
    cosine: float | None = None
    rerank: dict[str, float] | None = None


class EncoderHandle:
    """An encoder loaded from a spec (`lit-base`, `openclip:ViT-B-32`, a trained folder ...)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    @property
    def spec(self) -> str:
        return self.encoder.spec

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, texts: Iterable[str] | None = None, images: Iterable[Any] | None = None, *,
               role: str = "query", instruction: str | None = None):
        """Unit vectors (numpy, one row per input): texts, images (paths, bytes or PIL images),
        or both paired row by row (fused image+text). `role` is "query" or "document"."""
        texts = list(texts) if texts is not None else None
        images = list(images) if images is not None else None
        if texts is not None and images is not None and len(texts) != len(images):
            raise InvalidArgument(f"texts and images are paired row by row: got {len(texts)} texts and {len(images)} images")
        n = len(texts if texts is not None else images or [])
        if n == 0:
            raise InvalidArgument("give texts, images or both (at least one)")
        items = [Item(None, texts[i] if texts is not None else None, images[i] if images is not None else None)
                 for i in range(n)]
        return self.encoder.encode(items, role=role, instruction=instruction)


def load_encoder(spec: str) -> EncoderHandle:
    """An encoder by spec, loaded once per process and shared.

    Args:
        spec: `lit-base` (the default, pinned versions as `lit-base@1`), `tiny-clip`,
            `openclip:ARCH@PATH`, `hf-text:PATH`, `hf-mllm:PATH`, or a folder `umr train` wrote.
    Returns:
        An EncoderHandle whose `encode(texts=, images=)` gives unit vectors.
    Raises:
        EncoderError (a ValueError): an unknown or malformed spec, or weights that cannot load,
            with what to do instead.
    """
    return EncoderHandle(_load_encoder(spec))


def _encoder(encoder: str | EncoderHandle | Encoder | None) -> Encoder | None:
    if isinstance(encoder, EncoderHandle):
        return encoder.encoder
    if isinstance(encoder, str):
        return _load_encoder(encoder)
    return encoder


def _document(store_path: Path, doc) -> dict:
    image = None
    if doc.image:
        image = Path(doc.image) if Path(doc.image).is_absolute() else store_path / doc.image
    return {"id": doc.id, "modality": doc.modality, "text": doc.text, "image": image, "metadata": dict(doc.metadata)}


class Index:
    """An open index. Use as a context manager, or call close(): it holds the write lock unless
    opened with `read_only=True` (searching beside a running `umr serve` needs read_only).

    Errors are subclasses of umr.index.errors.UmrError, each message saying what to do:
    InvalidArgument (also a ValueError: bad input, nothing stored), NotFound (also a KeyError),
    IndexBusy (another process holds the write lock), IndexMismatch (the index was built another
    way: another encoder, other flags), IndexDamaged (a damaged store, refused rather than served).
    """

    def __init__(self, engine: Engine):
        self._engine = engine

    @classmethod
    def build(cls, corpus: str | Path, encoder: str | EncoderHandle = DEFAULT_ENCODER, out: str | Path | None = None, *,
              index_kind: str = "auto", batch_size: int = 64, memory_budget: int | None = None,
              progress: bool = False, ray: str | None = None, shard_size: int = 4096,
              vector_dtype: str = "float32", workers: int | None = None, worker_kind: str = "auto") -> "Index":
        """Read `corpus` (JSONL, an image folder with captions, an M-BEIR pool), encode it and
        write the index to `out`; returns it open for writing. Run again on an unfinished `out`,
        it resumes where the build stopped. `ray="auto"` (or a head node's address) encodes on a
        Ray cluster, as `umr index build --ray` does. `vector_dtype="float16"` keeps the exact
        vectors in half the disk. `workers` processes (`worker_kind="threads"`: threads) decode
        the images, one per core by default."""
        from umr.retrieval.indexing.pipeline import build_index

        if out is None:
            raise InvalidArgument("Index.build needs out=FOLDER, where the index is written")
        enc = _encoder(encoder)
        build_index(corpus, enc, out, index_kind=index_kind, batch_size=batch_size, memory_budget=memory_budget,
                    progress=progress, ray=ray, shard_size=shard_size, vector_dtype=vector_dtype,
                    workers=workers, worker_kind=worker_kind)
        return cls(Engine.open(out, enc))

    @classmethod
    def from_vectors(cls, vectors: str | Path, ids: str | Path, encoder: str | EncoderHandle = DEFAULT_ENCODER,
                     out: str | Path | None = None, *, modality: str = "image", index_kind: str = "auto",
                     memory_budget: int | None = None, progress: bool = False, vector_dtype: str = "float32") -> "Index":
        """An index of precomputed embeddings (an (n, dim) .npy and one id or record per row in a
        JSONL file), as `umr index build --vectors --ids` builds it; `encoder` is the model that
        made them, recorded as the query encoder and never run on the documents."""
        from umr.retrieval.indexing.vector_import import build_from_vectors

        if out is None:
            raise InvalidArgument("Index.from_vectors needs out=FOLDER, where the index is written")
        enc = _encoder(encoder)
        build_from_vectors(vectors, ids, enc, out, modality=modality, index_kind=index_kind,
                           memory_budget=memory_budget, progress=progress, vector_dtype=vector_dtype)
        return cls(Engine.open(out, enc))

    @classmethod
    def open(cls, path: str | Path, encoder: str | EncoderHandle | None = None, *, read_only: bool = False) -> "Index":
        """Open a built index.

        Args:
            path: the index folder `build` or `umr index build` wrote.
            encoder: the query encoder; default the index's active one. Another spec must
                match a registered encoder version's fingerprint.
            read_only: take no write lock, refuse writes: what a process beside a running
                `umr serve` (or another writer) needs.
        Raises:
            IndexBusy: another process writes to it and read_only is False.
            IndexError_: no index there, or an unfinished build (re-run its build to finish it).
            IndexMismatch: `encoder` is not one the index registered.
        """
        return cls(Engine.open(path, _encoder(encoder), mode="read" if read_only else "write"))

    @property
    def engine(self) -> Engine:
        """The engine underneath, for what this class does not wrap."""
        return self._engine

    @property
    def path(self) -> Path:
        return Path(self._engine.store.path)

    @property
    def encoder(self) -> EncoderHandle:
        return EncoderHandle(self._engine.encoder)

    def __len__(self) -> int:
        return self._engine.store.count()

    def info(self) -> dict:
        return self._engine.info()

    def search(self, text: str | None = None, image: Any = None, *, k: int = 10, modality: str | list[str] | None = None,
               filter: Mapping[str, str | int | float | bool] | None = None, instruction: str | None = None,
               calibrated: bool = True) -> list[Hit]:
        """The k best documents for a text, an image or both fused.

        Args:
            text, image: the query; an image is a path, bytes or a PIL image.
            k: how many hits, 1 or more (fewer come back when fewer documents match).
            modality: keep only documents of these modalities ("image", "text", "image,text").
            filter: metadata equality, e.g. {"year": 2001}; a number never equals a string.
            instruction: a task instruction prefixed to the query text (M-BEIR style).
            calibrated: False ranks by raw cosine alone (see Hit.score).
        Returns:
            Hits, best first.
        Raises:
            InvalidArgument: no query, a bad k, modality or filter, an unreadable image.
            ReaderBehind: opened read_only, and the index's writer has compacted it since;
                open it again (its rows are numbered anew, so answering would name the wrong documents).
        """
        if text is None and image is None:
            raise InvalidArgument("search needs text=, image= or both")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidArgument(f"k is a positive integer, got {k!r}")
        hits = self._engine.search([Query(text, image, instruction)], k, parse_modalities(modality),
                                   dict(filter) if filter else None, calibrated=calibrated)[0]
        return [Hit(**_document(self.path, h.doc), score=float(h.score),
                    cosine=None if h.cosine is None else float(h.cosine), rerank=h.details) for h in hits]

    def get(self, doc_id: str) -> Document:
        """The stored document `doc_id`; raises NotFound (a KeyError) when it is not there."""
        return Document(**_document(self.path, self._engine.get(doc_id)))

    def add(self, documents: Iterable[Mapping[str, Any] | Item]) -> list[str]:
        """Add or replace documents; a document whose id exists replaces it.

        Args:
            documents: mappings with "id", "text", "image" (a path or bytes) and "metadata", or Items.
        Returns:
            The ids stored, in order.
        Raises:
            InvalidArgument: a bad document (no id, unknown field, unreadable image ...). All or
                nothing: it raises before any document is stored. Durable on return.
        """
        items = []
        for d in documents:
            if isinstance(d, Item):
                items.append(d)
                continue
            unknown = set(d) - {"id", "text", "image", "metadata"}
            if unknown:
                raise InvalidArgument(f"unknown document field(s) {sorted(unknown)}: documents have id, text, image, metadata")
            items.append(Item(d.get("id"), d.get("text"), d.get("image"), dict(d.get("metadata") or {})))
        if not items:
            return []
        return self._engine.add(items)

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Delete documents; returns the ids that were there and are now deleted (ids that were
        not there are skipped, not an error). Durable on return."""
        return self._engine.delete(list(ids))

    def update(self, encoder: str | EncoderHandle | None = None, *, to: int | None = None,
               calibration: list[str] | None = None, method: str = "auto", sample: int | None = None,
               activate: bool = True, eval: str | Path | None = None, force: bool = False) -> dict:
        """Register a new encoder without re-indexing (query-drift compensation, as
        `umr update`), or with `to` return to a registered version (`umr update --to`):
        `calibration` query files, `sample` calibration pairs per modality, `eval` judged queries
        to compare on. With `activate`, this Index then queries with it. Returns the report
        `umr update --json` prints; raises UpdateRefused (a ValueError) when the compensated
        encoder would serve worse than the old one, unless `force`."""
        from umr.index.errors import InvalidArgument
        from umr.retrieval.update.fit import fit_update, registered_encoder

        if (encoder is None) == (to is None):
            raise InvalidArgument("update() takes an encoder (a new one) or to= (a version the index has registered)")
        new = _encoder(encoder) if encoder is not None else registered_encoder(self._engine.store, to)
        kwargs = {"per_modality": sample} if sample is not None else {}
        report = fit_update(self._engine.store, new, calibration, method, activate=activate,
                            eval_path=str(eval) if eval else None, force=force, **kwargs)
        if activate and report.get("active_version") == report.get("version"):
            path = self.path
            self._engine.close()
            self._engine = Engine.open(path, new)
        return report

    def checkpoint(self) -> None:
        self._engine.checkpoint()

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"umr.Index({str(self.path)!r}, {len(self)} documents, encoder {self._engine.encoder.spec})"
