"""Pure ASGI middlewares (no extra task per request): the body size limit, and the request
observer (id, metrics, log line)."""
from __future__ import annotations

import time

from umr.server.errors import error_response
from umr.server.metrics import Metrics
from umr.server.request_log import current_id, log_request, request_id


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over the limit before they are buffered: by Content-Length up front, and
    while a chunked body streams in. In the second case the route's own answer to a body cut
    short (FastAPI turns any read error into a generic 400) is replaced by the 413 that names
    the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self, size: int | None):
        said = f"request body is {size} bytes" if size is not None else "request body is"
        return error_response(413, "limit_body_bytes", f"{said} over the limit of {self.max_bytes} bytes (max_body_bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self.too_large(int(value))(scope, receive, send)
        seen, over, started = 0, False, False

        async def limited():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge()
            return msg

        async def guarded(message):
            nonlocal started
            if over:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self.too_large(None)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except BodyTooLarge:
            if not started:
                await self.too_large(None)(scope, receive, send)


class RequestObserver:
    """Outermost: gives the request its id (sent back as X-Request-ID and on every log record made
    meanwhile), then counts, times and logs it by route."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        token = current_id.set(rid)
        t0 = time.perf_counter()
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            log_request(scope, rid, status, seconds)
            current_id.reset(token)
