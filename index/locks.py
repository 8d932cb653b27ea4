"""Who may write an index: one process at a time, and manifest saves one at a time.

`write.lock` is held (flock, exclusive) by the one process that adds, deletes, checkpoints or
activates; a second writer is refused with the holder's pid and command, instead of racing it
on row numbers. The kernel drops the lock when its holder dies, even by SIGKILL, so a crash
never leaves a stale lock. Readers (`umr search`, `umr index info`, replicas) take no lock.
`manifest.lock` is held only around a read-merge-write of manifest.json, so `umr update
--no-activate` beside a running server and the server's own checkpoints never lose each
other's registrations.
"""
from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from umr.index import layout
from umr.index.errors import IndexError_



class IndexBusy(IndexError_):
    """Another process holds the index's write lock."""


class WriterLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / layout.WRITE_LOCK
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise IndexBusy(f"{self.path.parent} is open for writing by {holder}; stop it first, or send "
                            "documents through its HTTP API; to search beside it, open it read-only "
                            "(`umr.Index.open(path, read_only=True)`, `umr serve --read-only`; `umr search` "
                            "needs no lock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def manifest_lock(directory: Path):
    fd = os.open(Path(directory) / layout.MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
