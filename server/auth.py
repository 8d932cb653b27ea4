"""Who may do what: `read` (search, documents, index info), `write` (add, delete), `admin`
(encoder swap). With no key configured, reads and writes are open (a server on one's own
machine) and admin is off; once any key is configured, every write needs a `write` key and reads
need a `read` key unless the server was started with public reads. A client that keeps
presenting wrong keys is answered 429 for a while, so keys cannot be guessed at network speed."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from fastapi import Depends, Header, Request

from server.errors import ApiError
from server.keys import KeyEntry, KeyRing, allows, digest
from server.settings import ServerSettings
from server.state import ServerState, state


class FailedAttempts:
    """Per client: wrong keys within `window_s`; `max_failures` of them lock it out for
    `lockout_s`. Bounded memory: the least recently seen clients are forgotten first."""

    def __init__(self, max_failures: int, window_s: float, lockout_s: float, max_clients: int = 10_000):
        self.max_failures, self.window_s, self.lockout_s, self.max_clients = max_failures, window_s, lockout_s, max_clients
        self._fails: OrderedDict[str, deque] = OrderedDict()
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        with self._lock:
            until = self._locked.get(client, 0.0)
            left = until - time.monotonic()
            if left <= 0:
                self._locked.pop(client, None)
                return 0.0
            return left

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._fails.pop(client, None) or deque()
            q.append(now)
            while q and q[0] < now - self.window_s:
                q.popleft()
            if len(q) >= self.max_failures:
                self._locked[client] = now + self.lockout_s
                q.clear()
            self._fails[client] = q
            while len(self._fails) > self.max_clients:
                self._fails.popitem(last=False)


class Access:
    def __init__(self, settings: ServerSettings):
        entries = list(settings.keys.entries) if settings.keys else []
        if settings.admin_key:  # UMR_ADMIN_KEY / --admin-key-file: one admin key
            entries.append(KeyEntry("admin-key", "admin", digest(settings.admin_key), 0.0))
        self.ring = KeyRing(entries) if entries else None
        self.public_read = settings.public_read
        self.attempts = FailedAttempts(settings.auth_max_failures, settings.auth_window_s, settings.auth_lockout_s)

    def check(self, needed: str, given: str | None, client: str) -> None:
        if self.ring is None:
            if needed == "admin":
                raise ApiError(403, "admin_disabled", "admin endpoints are off: make an admin key with "
                                                      "`umr keys add --scope admin` (or set UMR_ADMIN_KEY)")
            return
        if needed == "read" and self.public_read:
            return
        wait = self.attempts.retry_after(client)
        if wait > 0:
            raise ApiError(429, "too_many_failed_attempts",
                           f"too many wrong API keys from this client; retry in {wait:.0f} s",
                           {"Retry-After": str(max(1, round(wait)))})
        scope = self.ring.scope_of(given)
        if scope is None:
            if given:
                self.attempts.failed(client)
            raise ApiError(401, "unauthorized", f"this needs an API key with scope '{needed}' "
                                                "(Authorization: Bearer KEY or X-API-Key: KEY)")
        if not allows(scope, needed):
            raise ApiError(403, "forbidden", f"this needs scope '{needed}'; the key given has scope '{scope}'")


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def requires(needed: str):
    """A route dependency: the request must carry a key allowing `needed` (see Access)."""

    async def dependency(request: Request, st: ServerState = Depends(state), authorization: str | None = Header(None),
                         x_api_key: str | None = Header(None)) -> None:
        client = request.client.host if request.client else "unknown"
        st.access.check(needed, presented_key(authorization, x_api_key), client)

    return Depends(dependency)
