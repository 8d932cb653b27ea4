"""Error bodies: every failure is JSON `{"error": {"code", "message"}}`; the unexpected ones
also carry an `id` that is logged with the traceback, so a user's report finds the log line.

What umr raises on purpose (index/errors.py UmrError and its kinds) reaches clients through
one table, REFUSALS, the same for every route: a route names only what the request was about
("query", "search", "document"), which words the code of a bad-input answer."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from umr.index.errors import IndexDamaged, IndexError_, IndexMismatch, InvalidArgument, NotFound, ReaderBehind, UmrError
from umr.index.document_rules import InvalidDocument
from umr.retrieval.encoders.base import EncoderError
from umr.retrieval.engine import CompensationMissing
from umr.retrieval.engine_swap import SwapRefused
from umr.retrieval.images import BadImage
from umr.server.request_log import current_id

log = logging.getLogger("umr.server")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 query: int | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.query = query  # in a batch search: which query was refused


@dataclass(frozen=True)
class Refusal:
    """How one kind of refusal answers: its status and code, each fixed or read off the error."""

    kind: type[UmrError]
    status: int | Callable[[UmrError], int]
    code: str | Callable[[UmrError], str]
    prefix: str = ""  # before the message, e.g. "image: "


# Most specific first: the first kind an error is an instance of answers. IndexDamaged is not
# here: the index, not the request, is at fault (a 500 from its own handler below).
REFUSALS: list[Refusal] = [
    Refusal(BadImage, lambda e: 413 if e.code.startswith("limit") else 400, lambda e: e.code, "image: "),
    Refusal(InvalidDocument, 422, "invalid_document"),
    Refusal(EncoderError, 409, "encoder_unusable"),
    Refusal(InvalidArgument, 400, "invalid_{about}"),
    Refusal(NotFound, 404, "not_found"),
    Refusal(SwapRefused, lambda e: 404 if e.reason == "unknown_version" else 409, lambda e: e.reason),
    Refusal(CompensationMissing, 409, "no_compensator"),
    Refusal(IndexMismatch, 409, "index_changed"),
    Refusal(ReaderBehind, 503, "index_reopening"),  # transient: the follower reopens the index
    Refusal(IndexError_, 409, "index_state"),
]


def refusal(e: BaseException, about: str = "request") -> BaseException:
    """The ApiError a route raises for `e`, or `e` itself where it is not a refusal (a damaged
    index, a bug: the server's fault, answered 500 with an id)."""
    if isinstance(e, IndexDamaged) or not isinstance(e, UmrError):
        return e
    for r in REFUSALS:
        if isinstance(e, r.kind):
            status = r.status(e) if callable(r.status) else r.status
            code = r.code(e) if callable(r.code) else r.code.format(about=about)
            return ApiError(status, code, f"{r.prefix}{e}")
    return e


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        extra = {} if e.query is None else {"query": e.query}
        return error_response(e.status, e.code, e.message, e.headers, **extra)

    @app.exception_handler(IndexDamaged)
    async def index_damaged(request: Request, e: IndexDamaged):
        # The index, not the request, is at fault: 5xx, so clients do not give up on the request
        # as their own mistake; the message says how to check the index, never where it lies.
        error_id = current_id.get() or uuid.uuid4().hex[:12]
        log.error("index damaged (%s) on %s %s: %s", error_id, request.method, request.url.path, e)
        return error_response(500, "index_damaged", "the index this server reads is damaged; its operator should "
                                                    f"run `umr index verify` on it (quote id {error_id})", id=error_id)

    @app.exception_handler(UmrError)
    async def refused(request: Request, e: UmrError):
        """A refusal no route turned into an ApiError answers by the same table."""
        answer = refusal(e)
        if isinstance(answer, ApiError):
            return error_response(answer.status, answer.code, answer.message)
        raise e

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(422, "invalid_request", validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and e.detail == "There was an error parsing the body":
            return error_response(400, "invalid_body", "the request body cannot be parsed: send UTF-8 JSON "
                                                       "(or, for uploads, multipart form data)")
        return error_response(e.status_code, "http_error", str(e.detail))


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors in the API's words: one message per field. A field that takes one of
    several forms (`modality`: a name or a list of names) fails once per form, each located
    under pydantic's name for the form ("literal['image','text']", "list[...]"); the form that
    got furthest into the value (the longest location) is the one a client needs, with the
    value that was sent."""
    best: dict[str, tuple[list, dict]] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_form_tag(x)]
        field = loc[0] if loc else ""
        if field not in best or len(loc) > len(best[field][0]):
            best[field] = (loc, err)
    parts = []
    for loc, err in list(best.values())[:5]:
        where = ".".join(loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
            continue
        sent = err.get("input")
        got = f" (got {sent!r})" if isinstance(sent, (str, int, float, bool)) and len(repr(sent)) <= 80 else ""
        parts.append(f"{where or 'body'}: {err.get('msg')}{got}")
    return "; ".join(parts) or "invalid request"


def _is_form_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


class InternalErrors:
    """Pure ASGI middleware: an exception no handler expected becomes a 500 JSON error with an
    id, logged with its traceback under the same id; other requests never see it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            error_id = current_id.get() or uuid.uuid4().hex[:12]  # the request's own id when it has one
            log.exception("internal error %s on %s %s", error_id, scope.get("method"), scope.get("path"))
            if started:  # the answer is half sent: all that is left is to cut it short
                raise
            resp = error_response(500, "internal", f"internal server error; quote id {error_id} when reporting it",
                                  id=error_id)
            await resp(scope, receive, send)


def declared(*statuses: int) -> dict:
    """OpenAPI `responses` for the error statuses a route can answer (any route may answer 400
    to a request it cannot parse, and 500)."""
    from umr.server.schemas import ErrorBody

    return {s: {"model": ErrorBody, "description": DESCRIPTIONS[s]} for s in sorted({*statuses, 400, 500})}


DESCRIPTIONS = {400: "Bad input (unparsable body, undecodable image or base64, invalid search)", 401: "Missing or wrong API key",
                403: "Not allowed", 404: "Not found", 409: "Conflicts with the index's state",
                413: "Over a documented size limit", 415: "Unsupported Content-Type",
                422: "Invalid request", 429: "Too many failed attempts", 500: "Internal error (with an id to report)",
                503: "Unavailable for now (a read-only server reopening an index its writer compacted, a writer not answering): send it again"}
