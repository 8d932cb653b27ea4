"""API keys with scopes, kept as hashes in a JSON key file.

A key is 32 random bytes, so a plain SHA-256 of it cannot be reversed or guessed from the file
(a slow password hash buys nothing for keys nobody chose); the key itself is shown once, when
`umr keys add` makes it. Scopes nest: `admin` can do what `write` can, `write` what `read` can.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from umr.index.errors import InvalidArgument

SCOPES = ("read", "write", "admin")
PREFIX = "umr_"


class KeyFileError(InvalidArgument):
    """The key file is missing, unreadable or malformed; the message says which."""


def default_key_file() -> Path:
    env = os.environ.get("UMR_KEY_FILE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "umr" / "keys.json"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def allows(scope: str, needed: str) -> bool:
    return SCOPES.index(scope) >= SCOPES.index(needed)


@dataclass(frozen=True)
class KeyEntry:
    name: str
    scope: str
    sha256: str
    created: float


class KeyRing:
    def __init__(self, entries: list[KeyEntry]):
        self.entries = entries

    @classmethod
    def load(cls, path: Path) -> "KeyRing":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist; make a key with `umr keys add --scope read`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise KeyFileError(f"cannot read key file {path}: {e}") from None
        try:
            entries = [KeyEntry(k["name"], k["scope"], k["sha256"], float(k.get("created", 0))) for k in raw["keys"]]
        except (KeyError, TypeError, ValueError):
            raise KeyFileError(f"key file {path} is not a umr key file ({{\"keys\": [{{name, scope, sha256}}]}})") from None
        for e in entries:
            if e.scope not in SCOPES:
                raise KeyFileError(f"key {e.name!r} in {path} has scope {e.scope!r}; scopes are {', '.join(SCOPES)}")
        return cls(entries)

    def scope_of(self, given: str | None) -> str | None:
        """The scope of a presented key, or None; every stored hash is compared, in constant time."""
        if not given:
            return None
        d = digest(given)
        found = None
        for e in self.entries:
            if hmac.compare_digest(d, e.sha256):
                found = e.scope
        return found

    def __len__(self) -> int:
        return len(self.entries)


def _write(path: Path, entries: list[KeyEntry]) -> None:
    from umr.index.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"keys": [e.__dict__ for e in entries]}
    atomic_write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())
    os.chmod(path, 0o600)


def _entries(path: Path) -> list[KeyEntry]:
    return KeyRing.load(path).entries if path.exists() else []


def add_key(path: Path, scope: str, name: str | None = None) -> tuple[str, KeyEntry]:
    """Make a key, store its hash; returns the key (shown once) and its entry."""
    if scope not in SCOPES:
        raise KeyFileError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    entries = _entries(path)
    name = name or f"{scope}-{len(entries) + 1}"
    if any(e.name == name for e in entries):
        raise KeyFileError(f"a key named {name!r} is already in {path}; pick another --name or revoke it")
    key = PREFIX + secrets.token_urlsafe(32)
    entry = KeyEntry(name, scope, digest(key), round(time.time(), 3))
    _write(path, [*entries, entry])
    return key, entry


def revoke_key(path: Path, name: str) -> None:
    entries = _entries(path)
    if not any(e.name == name for e in entries):
        raise KeyFileError(f"no key named {name!r} in {path}")
    _write(path, [e for e in entries if e.name != name])


def list_keys(path: Path) -> list[KeyEntry]:
    return _entries(path)
