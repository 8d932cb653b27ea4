"""Who may do what: `read` (search, documents, index info), `write` (add, delete), `admin`
(encoder swap). With no key configured, reads and writes are open (a server on one's own
machine) and admin is off; once any key is configured, every write needs a `write` key and reads
need a `read` key unless the server was started with public reads. A client that keeps
presenting wrong keys is answered 429 for a while (see Access for whom that stops and whom not)."""
from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

from fastapi import Depends, Header, Request

from umr.server.errors import ApiError
from umr.server.keys import KeyFileError, KeyRing, allows, digest
from umr.server.settings import ServerSettings
from umr.server.state import ServerState, state

log = logging.getLogger("umr.server")
KEY_FILE_LOOK_S = 1.0  # how often a server looks whether its key file changed


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
    """Keys from the key file are 32 random bytes: no rate of guessing finds one, so a valid one
    is always let in, whatever other clients at its address did (a bad client behind the same
    NAT cannot lock good keys out). A client's wrong keys lock that client out: its requests
    without a valid key get 429, and the one key a person may have chosen (UMR_ADMIN_KEY,
    --admin-key-file), which guessing could find, is not even compared for it meanwhile. The key
    file is watched: `umr keys revoke` and `umr keys add` take effect within KEY_FILE_LOOK_S."""

    def __init__(self, settings: ServerSettings):
        self.ring = settings.keys
        self.admin_digest = digest(settings.admin_key) if settings.admin_key else None
        # Once any key is configured the server stays guarded, even should the file lose them all.
        self.guarded = bool(self.ring) or self.admin_digest is not None
        self.key_file = settings.key_file if self.ring is not None else None
        self.public_read = settings.public_read
        self.attempts = FailedAttempts(settings.auth_max_failures, settings.auth_window_s, settings.auth_lockout_s)
        self._stamp = _stamp(self.key_file)
        self._next_look = time.monotonic() + KEY_FILE_LOOK_S

    def scope_of(self, given: str | None, locked: bool) -> str | None:
        if not given:
            return None
        scope = self.ring.scope_of(given) if self.ring is not None else None
        if scope is None and self.admin_digest is not None and not locked \
                and hmac.compare_digest(digest(given), self.admin_digest):
            scope = "admin"
        return scope

    def check(self, needed: str, given: str | None, client: str) -> None:
        if not self.guarded:
            if needed == "admin":
                raise ApiError(403, "admin_disabled", "admin endpoints are off: make an admin key with "
                                                      "`umr keys add --scope admin` (or set UMR_ADMIN_KEY)")
            return
        if needed == "read" and self.public_read:
            return
        self.reload_if_changed()
        wait = self.attempts.retry_after(client)
        scope = self.scope_of(given, locked=wait > 0)
        if scope is None:
            if wait > 0:
                raise ApiError(429, "too_many_failed_attempts",
                               f"too many wrong API keys from this client; retry in {wait:.0f} s",
                               {"Retry-After": str(max(1, round(wait)))})
            if given:
                self.attempts.failed(client)
            raise ApiError(401, "unauthorized", f"this needs an API key with scope '{needed}' "
                                                "(Authorization: Bearer KEY or X-API-Key: KEY)")
        if not allows(scope, needed):
            raise ApiError(403, "forbidden", f"this needs scope '{needed}'; the key given has scope '{scope}'")

    def reload_if_changed(self) -> None:
        """Take the key file again when it changed (looked at once per KEY_FILE_LOOK_S at most).
        A file that is gone or cannot be read leaves no file key valid until it can be: a
        server started with keys never falls open."""
        if self.key_file is None or time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + KEY_FILE_LOOK_S
        stamp = _stamp(self.key_file)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.ring = KeyRing.load(self.key_file)
            log.info("key file %s changed: %d key(s) now", self.key_file, len(self.ring))
        except KeyFileError as e:
            self.ring = KeyRing([])
            log.error("%s; refusing every key from it until it can be read again", e)


def _stamp(path: Path | None) -> tuple | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return ("missing",)
    return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)


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
