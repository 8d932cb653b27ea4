"""Everything about a request that can be checked before it joins a batch is checked here and
answered 4xx, so a batch only ever holds queries the model can take (server/batching.py
still isolates a failure that slips through)."""
from __future__ import annotations

import base64
import binascii
import math
import re

from fastapi import Request

from umr.index.documents import validate_filter
from umr.index.document_rules import InvalidDocument, check_document, has_visible_text, unicode_problem
from umr.retrieval.items import parse_modalities
from umr.server.errors import ApiError, refusal
from umr.server.settings import ServerSettings

_DATA_URL = re.compile(r"^data:[\w.+\-]+/[\w.+\-]+(;[\w\-]+=[\w\-.]+)*;base64,", re.I)
_WHITESPACE = re.compile(rb"\s+")


async def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {ctype or 'none'!r}")


class RequestChecks:
    def __init__(self, settings: ServerSettings):
        self.settings = settings

    def text(self, text: str | None, field: str) -> None:
        if text is None:
            return
        if len(text) > self.settings.max_text_chars:
            raise ApiError(413, "limit_text_chars", f"{field} has {len(text)} characters, over the limit of "
                                                    f"{self.settings.max_text_chars} (max_text_chars)")
        problem = unicode_problem(text)
        if problem:
            raise ApiError(422, "invalid_text", f"{field} {problem}")

    def k(self, k: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise ApiError(422, "limit_k", f"k must be between 1 and {self.settings.max_k} (max_k), got {k}")

    def query(self, text: str | None, image: object, instruction: str | None) -> None:
        self.text(text, "text")
        self.text(instruction, "instruction")
        if not has_visible_text(text) and not image:
            raise ApiError(422, "empty_query", "a query needs text, image or both (text of only blanks or "
                                               "zero-width characters is empty)")

    def filter(self, flt: dict | None) -> dict | None:
        if not flt:
            return flt
        try:
            validate_filter(flt)
        except ValueError as e:
            raise ApiError(422, "invalid_filter", str(e)) from None
        for key, value in flt.items():
            problem = unicode_problem(value) if isinstance(value, str) else None
            if problem:
                raise ApiError(422, "invalid_filter", f"filter value for {key!r} {problem}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ApiError(422, "invalid_filter", f"filter value for {key!r} is {value}: not a JSON number")
        return flt

    @staticmethod
    def modalities(m) -> list[str] | None:
        try:
            return parse_modalities(m)
        except ValueError as e:
            raise ApiError(422, "invalid_modality", str(e)) from None

    def base64_image(self, data: str, field: str) -> bytes:
        """Bytes of a base64 image; a `data:image/...;base64,` prefix and line breaks (what
        browsers' FileReader and MIME encoders produce) are accepted."""
        prefix = _DATA_URL.match(data[:200])
        if prefix:
            data = data[prefix.end():]
        elif data[:5].lower() == "data:":
            raise ApiError(400, "invalid_base64", f"{field} is a data URL without ';base64,': send base64 image bytes")
        raw = _WHITESPACE.sub(b"", data.encode("ascii", "replace"))
        if len(raw) * 3 // 4 > self.settings.max_image_bytes:
            raise ApiError(413, "limit_image_bytes", f"{field} is about {len(raw) * 3 // 4} bytes, over the limit of "
                                                     f"{self.settings.max_image_bytes} (max_image_bytes)")
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", f"{field} is not valid base64") from None

    def document(self, doc_id: str, text: str | None, has_image: bool, metadata: dict) -> None:
        self.text(text, f"document {doc_id[:80]!r} text")
        try:
            check_document(doc_id, text, metadata)
        except InvalidDocument as e:
            raise refusal(e, "document") from None
        if not has_image and not has_visible_text(text):
            raise ApiError(422, "empty_document", f"document {doc_id[:80]!r} has neither text nor image")
