"""What a stored document may hold, checked before it is written.

A document is acknowledged once; it is then returned by every GET of it and every search whose
top k holds it, across restarts. Anything that cannot be served back (a lone surrogate, which
UTF-8 cannot encode; NaN, which JSON cannot carry; metadata nested past what a JSON parser
recurses into) would turn those reads into errors until the document is deleted, so it is
refused at the write, where the one request that brought it gets the error.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata

from umr.index.errors import InvalidArgument

MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024  # serialised; returned with every hit, so kept small
MAX_METADATA_DEPTH = 32  # nesting of objects and lists below the metadata object itself
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly


class InvalidDocument(InvalidArgument):
    """The document would be stored but could not be served back; the message says why."""


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be stored and served as UTF-8, or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at position {e.start})"
    return None


def has_visible_text(text: str | None) -> bool:
    """False for None and for text of only whitespace, controls and format characters
    (zero-width spaces and joiners, BOM): nothing a tokenizer turns into content."""
    if not text:
        return False
    return any(not (ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")) for ch in text)


def check_text(text, what: str) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise InvalidDocument(f"{what} must be a string")
    problem = unicode_problem(text)
    if problem:
        raise InvalidDocument(f"{what} {problem}")


def _check_value(value, path: str, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise InvalidDocument(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels (at {path})")
    if isinstance(value, str):
        check_text(value, f"metadata {path}")
    elif isinstance(value, bool) or value is None or isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidDocument(f"metadata {path} is {value}: JSON has no NaN or Infinity")
    elif isinstance(value, dict):
        for key, sub in value.items():
            if not isinstance(key, str):
                raise InvalidDocument(f"metadata {path} has a key that is not a string")
            check_text(key, f"metadata key {path}.{key[:40]!r}")
            _check_value(sub, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_value(sub, f"{path}[{i}]", depth + 1)
    else:
        raise InvalidDocument(f"metadata {path} is a {type(value).__name__}, not a JSON value")


def metadata_json(metadata) -> str:
    """The metadata as stored: checked, then serialised (sorted keys, no NaN)."""
    if not isinstance(metadata, dict):
        raise InvalidDocument("metadata must be a JSON object")
    if not metadata:
        return "{}"
    _check_value(metadata, "$", 0)
    blob = json.dumps(metadata, sort_keys=True, allow_nan=False)
    size = len(blob.encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidDocument(f"metadata is {size} bytes as JSON, over the limit of {MAX_METADATA_BYTES}")
    return blob


def id_problem(doc_id: str) -> str | None:
    """Why an id could not be addressed as `/v1/documents/{id}` (GET, DELETE, its image), or None.

    Ids travel percent-escaped in one path segment, so '/', '?', '#' and spaces are fine. What is
    refused: control characters (a router never matches a newline), a path that ends in
    `/image` (the same URL names another document's image) and the ids '.' and '..', which every
    client resolves as path steps even when escaped."""
    control = CONTROL.search(doc_id)
    if control:
        return f"holds the control character U+{ord(control.group()):04X}; ids must be addressable in a URL"
    if doc_id in (".", ".."):
        return "is a path step ('.' and '..' cannot be addressed in a URL)"
    if doc_id.endswith("/image"):
        return "ends in '/image', which names another document's image in the HTTP API"
    return None


def check_document(doc_id, text, metadata, image: str | None = None) -> str:
    """The metadata as stored (see metadata_json); raises InvalidDocument unless the document
    can be stored and served back unchanged."""
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidDocument("every document needs a non-empty string id")
    if len(doc_id) > MAX_ID_CHARS:
        raise InvalidDocument(f"id has {len(doc_id)} characters, over the limit of {MAX_ID_CHARS}")
    check_text(doc_id, "id")
    problem = id_problem(doc_id)
    if problem:
        raise InvalidDocument(f"id {doc_id[:80]!r} {problem}")
    check_text(text, f"document {doc_id[:80]!r} text")
    check_text(image, f"document {doc_id[:80]!r} image reference")
    try:
        return metadata_json(metadata)
    except InvalidDocument as e:
        raise InvalidDocument(f"document {doc_id[:80]!r}: {e}") from None
