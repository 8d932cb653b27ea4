"""How many writes the document store acknowledged, kept where its write-ahead log cannot take
them along.

A commit is durable once it is in docs.sqlite-wal; SQLite copies it into docs.sqlite later.
Should the WAL go missing (a backup or a copy that took docs.sqlite alone, a cleanup of "temp"
files after a crash), SQLite opens the older docs.sqlite without a word, and the documents
acknowledged since its last copy are gone. The FAISS checkpoints only tell when they are newer
than what is left.

So every write transaction also counts itself in docs.sqlite (meta `commits`), and the writer
puts the count in this small file beside it after each commit (a write to the page cache, no
fsync: it survives a killed process, and after a power loss it can only be behind, which
makes the check miss, never refuse wrongly). On open, a document store holding fewer commits
than the mark says has lost writes: it is refused until its WAL is put back or the loss is
accepted with `umr index verify --repair`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from umr.index import layout

MAGIC = "umr-commits 1"
WIDTH = 96  # one fixed-size record, rewritten in place


@dataclass(frozen=True)
class Mark:
    docstore_id: str
    commits: int


def path_beside(docstore: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(docstore)}{layout.COMMIT_MARK_SUFFIX}")


def read(docstore: str | os.PathLike) -> Mark | None:
    """The mark beside a document store, or None when there is none (an older umr, a fresh
    index) or it cannot be read (then nothing can be concluded from it)."""
    try:
        words = path_beside(docstore).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) != 4 or " ".join(words[:2]) != MAGIC or not words[3].isdigit():
        return None
    return Mark(words[2], int(words[3]))


class MarkWriter:
    """The writer's open handle on the mark: one pwrite per commit."""

    def __init__(self, docstore: str | os.PathLike, docstore_id: str):
        from umr.index.atomic import FILE_MODE

        self.docstore_id = docstore_id
        self._fd = os.open(path_beside(docstore), os.O_RDWR | os.O_CREAT, FILE_MODE)

    def write(self, commits: int, sync: bool = False) -> None:
        record = f"{MAGIC} {self.docstore_id} {commits}".ljust(WIDTH - 1) + "\n"
        os.pwrite(self._fd, record.encode("ascii"), 0)
        if sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
