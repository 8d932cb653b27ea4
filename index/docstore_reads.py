"""What a read-only process reads from the document store to keep up with its writer
(index/follow.py): whether anything was committed, and what, in one snapshot. Apart from
index/docstore.py, which keeps the documents and the writes, as the reads of one concept."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from umr.index.damage import damage_as_error


@dataclass
class Changes:
    """What other connections committed since a reader last looked (DocStore.changes_since)."""

    death_seq: int  # the last death seen: where the next look starts
    deaths: list[tuple[int, int]]  # (segment, row) made dead
    rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # segment -> (vectors, codes, alive) of new rows


class ReaderReads:
    """Mixed into DocStore, whose connection (`_db`), lock and vectors these read."""

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite's PRAGMA data_version): a
        follower's free test of whether there is anything to look at."""
        with self.lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def last_death(self) -> int:
        with self.lock:
            try:
                return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM deaths").fetchone()[0])
            except sqlite3.OperationalError:  # an index no writer of this version has opened yet
                return 0

    @damage_as_error
    def changes_since(self, death_seq: int, row_counts: dict[int, int]) -> Changes:
        """Deaths after `death_seq` and the rows of each segment from `row_counts[segment]` on,
        read in one snapshot, so what they show is what the writer had committed at one moment."""
        rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        with self.lock:
            self._db.execute("BEGIN")
            try:
                try:
                    found = self._db.execute("SELECT seq, segment, row FROM deaths WHERE seq>? ORDER BY seq",
                                             (death_seq,)).fetchall()
                except sqlite3.OperationalError:
                    found = []
                for segment, start in row_counts.items():
                    got = self._db.execute("SELECT row, modality, alive FROM rows WHERE segment=? AND row>=? "
                                           "ORDER BY row", (segment, start)).fetchall()
                    if got and got[0][0] == start and got[-1][0] == start + len(got) - 1:
                        rows[segment] = (self.vectors.read_range(segment, start, start + len(got)),
                                         np.array([g[1] for g in got], dtype=np.uint8),
                                         np.array([bool(g[2]) for g in got]))
            finally:
                self._db.execute("COMMIT")
        return Changes(found[-1][0] if found else death_seq, [(f[1], f[2]) for f in found], rows)
