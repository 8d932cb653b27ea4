"""Request and response models. Unknown fields are rejected so a typo is never silently ignored."""
from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Modality = Literal["image", "text", "image,text"]


class SearchRequest(Strict):
    text: str | None = Field(None, description="Query text.")
    image: str | None = Field(None, description="Query image, base64-encoded bytes (no URLs, no paths).")
    instruction: str | None = Field(None, description="Task instruction, prefixed to the query text.")
    k: StrictInt = Field(10, description="Number of results.")
    modality: Modality | list[Modality] | None = Field(None, description="Only return documents of these modalities.")
    filter: dict[str, str | int | float | bool] | None = Field(None, description="Metadata equality filter.")
    calibrated: StrictBool = Field(True, description="Rank by calibrated scores: across document modalities (in [0, 1]) "
                             "and across encoder versions (the active encoder's cosine, in (-1, 1)); hits then carry "
                             "their raw `cosine` too. false: raw cosines and nothing else.")


class BatchSearchRequest(Strict):
    queries: list[SearchRequest]


def image_url(doc) -> str | None:
    """The server's own reference to a stored image, never where it lies on the server's disk.
    The id is escaped whole ('/' too): an id such as `x/../y` must not become a path that a
    client normalises into another document's."""
    return f"/v1/documents/{quote(doc.id, safe='')}/image" if doc.image else None


class Hit(BaseModel):
    id: str
    score: float  # cosine; calibrated (docs/merging.md) when `cosine` is set; cos + w * P(yes) when re-ranked
    cosine: float | None = None  # the raw cosine behind a calibrated `score`
    rerank: dict[str, float] | None = None  # {"cosine", "p_yes"} behind a re-ranked score
    modality: str
    text: str | None = None
    image: str | None = Field(None, description="URL path of the stored image (GET it, with ?size= for a thumbnail).")
    metadata: dict[str, Any] = {}

    @classmethod
    def of(cls, h) -> "Hit":
        """From the engine's SearchHit."""
        d = h.doc  # the engine's own values, checked when stored: built without validating them again
        return cls.model_construct(id=d.id, score=round(h.score, 6),
                                   cosine=None if h.cosine is None else round(h.cosine, 6), rerank=h.details,
                                   modality=d.modality, text=d.text, image=image_url(d), metadata=d.metadata)


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float
    encoder_version: int = Field(..., description="The encoder version that served this query.")


class BatchSearchResponse(BaseModel):
    results: list[list[Hit]]
    took_ms: float
    encoder_version: int


class DocumentIn(Strict):
    id: str = Field(..., min_length=1, max_length=512)
    text: str | None = None
    image: str | None = Field(None, description="Image bytes, base64-encoded.")
    metadata: dict[str, Any] = {}


class DocumentsIn(Strict):
    documents: list[DocumentIn]


class DocumentsAdded(BaseModel):
    added: list[str]
    durable: bool = True


class Document(BaseModel):
    id: str
    modality: str
    text: str | None = None
    image: str | None = Field(None, description="URL path of the stored image.")
    metadata: dict[str, Any] = {}

    @classmethod
    def of(cls, doc) -> "Document":
        return cls(id=doc.id, modality=doc.modality, text=doc.text, image=image_url(doc), metadata=doc.metadata)


class ErrorBody(BaseModel):
    error: dict[str, str | int]  # code, message; id (500), query (which query of a batch)


class ActivateEncoder(Strict):
    version: StrictInt = Field(..., description="A version registered with `umr update --no-activate`.")
