"""A document as the index stores and returns it, the modalities it may have, and the rules a
batch and a metadata filter must pass before anything is written or searched.

Its own module so that every layer (the store, the search plan, the server's request checks)
can name a document without reaching into the SQLite store that keeps them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from umr.index.errors import InvalidArgument

MODALITY_CODES = {"image": 1, "text": 2, "image,text": 3}
CODE_MODALITIES = {v: k for k, v in MODALITY_CODES.items()}
_FILTER_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class DocRecord:
    """A stored document: what search results return and what `GET /v1/documents/{id}` shows."""

    id: str
    modality: str
    text: str | None = None
    image: str | None = None
    metadata: dict = field(default_factory=dict)
    # The metadata as check_document stored it, when the caller has checked this document
    # already (an import reads and checks each row once); None: checked here.
    checked_metadata: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"id": self.id, "modality": self.modality, "text": self.text, "image": self.image, "metadata": self.metadata}


def validate_filter(flt: dict | None) -> dict:
    flt = flt or {}
    for key, value in flt.items():
        if not _FILTER_KEY.match(key):
            raise InvalidArgument(f"filter key {key!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise InvalidArgument(f"filter value for {key!r} must be a string, number or boolean (equality only)")
    return flt


@dataclass(frozen=True)
class PlainDocs:
    """A batch of documents that are ids alone, all of one modality, checked already: an
    import's common case, stored without a Python object per row (building a DocRecord for each
    of 10M rows, then reading it back field by field, was a fifth of the import's ingest).
    Iterating gives the DocRecords it stands for."""

    ids: list[str]
    modality: str

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return (DocRecord(doc_id, self.modality, checked_metadata="{}") for doc_id in self.ids)


def modality_codes(docs: list[DocRecord] | PlainDocs) -> list[int]:
    """Each document's modality code (MODALITY_CODES), in order."""
    if isinstance(docs, PlainDocs):
        return [MODALITY_CODES[docs.modality]] * len(docs)
    return [MODALITY_CODES[d.modality] for d in docs]


def check_batch(docs: list[DocRecord] | PlainDocs) -> None:
    """Every modality known and no id twice: a batch is stored whole or not at all."""
    if isinstance(docs, PlainDocs) and docs.modality in MODALITY_CODES and len(set(docs.ids)) == len(docs.ids):
        return
    seen: set[str] = set()
    for d in docs:
        if d.modality not in MODALITY_CODES:
            raise InvalidArgument(f"document {d.id!r}: unknown modality {d.modality!r}")
        if d.id in seen:
            raise InvalidArgument(f"document id {d.id!r} appears twice in one batch")
        seen.add(d.id)
