"""Request ids and the request log (server/middleware.py's RequestObserver calls these).

Each request gets an id (the client's `X-Request-ID` when it is a short token, else a new one),
sent back in the `X-Request-ID` header, attached to every log record made while the request is
handled (a contextvar read by a logging filter) and to the body of a 500. One log line per
request at INFO: method, path, status, milliseconds.
"""
from __future__ import annotations

import contextvars
import logging
import re
import uuid

log = logging.getLogger("umr.server.requests")
current_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("umr_request_id", default=None)
TOKEN = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being handled on every record (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_id.get()
        return True


def install_filter() -> None:
    """On the handlers of the root logger, so records of every logger carry the id."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def request_id(scope) -> str:
    given = next((v for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
    return given.decode() if given is not None and TOKEN.match(given) else uuid.uuid4().hex[:16]


def log_request(scope, rid: str, status: int, seconds: float) -> None:
    if log.isEnabledFor(logging.INFO):
        ms = round(seconds * 1000, 2)
        client = scope.get("client")[0] if scope.get("client") else None
        log.info("%s %s %d %.2f ms", scope.get("method"), scope.get("path"), status, ms,
                 extra={"request_id": rid, "method": scope.get("method"), "path": scope.get("path"), "status": status,
                        "ms": ms, "client": client})
