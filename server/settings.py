"""Limits and batching knobs of the HTTP service; every limit is named in the error it causes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from umr.server.keys import KeyRing


@dataclass
class ServerSettings:
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_aspect: float = 100.0  # longer side / shorter side; beyond 4:1 the centre is cut out
    max_text_chars: int = 2_000
    max_k: int = 1_000
    max_batch_queries: int = 64
    max_documents_per_request: int = 256
    # A background FAISS checkpoint after this many added rows or this many seconds since the
    # first add after the last one (0 and 0: only at shutdown); bounds the replay on restart.
    checkpoint_every_rows: int = 10_000
    checkpoint_every_s: float = 30.0
    # A read-only server looks for the writer's commits this often (0: never; it serves the
    # index as it was when it opened); a replica relays writes to writer_url.
    follow_every_s: float = 0.25
    writer_url: str | None = None
    replica_name: str | None = None  # under `umr serve --replicas`: which one answered (/healthz)
    micro_batching: bool = True
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    # Admin endpoints are off unless a key is set; never printed, logged or returned.
    admin_key: str | None = field(default=None, repr=False)
    keys: KeyRing | None = field(default=None, repr=False)  # from a key file (server/keys.py)
    key_file: Path | None = None  # where `keys` came from: watched, so revoking a key takes effect at once
    public_read: bool = False  # with keys configured: searches and reads need no key
    auth_max_failures: int = 10  # wrong keys from one client within auth_window_s ...
    auth_window_s: float = 60.0
    auth_lockout_s: float = 60.0  # ... answer 429 for this long
