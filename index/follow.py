"""A read-only store's catch-up with the writer of the same directory.

Rows the writer commits join their segments, rows it deletes or replaces become tombstones; a
change of shape (another encoder version activated, a segment added or compacted, a build
finished, a memory-mapped segment checkpointed with a long tail) is not applied in place: the
reader is told to reopen (server/follower.py does)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from umr.index import layout
from umr.index.docstore import DocStore
from umr.index.errors import IndexError_
from umr.index.manifest import read_manifest
from umr.index.segment import Segment

# A follower reopens a memory-mapped segment once the writer has checkpointed it and this many
# rows wait in its exact-scan tail (a scan of 100k rows costs about what the IVF search does).
TAIL_REOPEN_ROWS = 100_000


@dataclass
class Followed:
    """What one catch-up applied."""

    rows: int = 0
    deaths: int = 0
    reopen: str | None = None  # why this store must be reopened instead (the writer changed its shape)


def manifest_stamp(path: Path) -> tuple | None:
    """When and how the manifest was last replaced (it is always replaced whole, atomically)."""
    try:
        st = (path / layout.MANIFEST).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class ReaderPosition:
    """How much of the writer's commits a reader has applied. Taken when the store opens,
    before its rows are read, so a death committed meanwhile is applied again, never missed."""

    death_seq: int
    manifest_stamp: tuple | None
    data_version: int = -1

    @classmethod
    def at_open(cls, path: Path, docs: DocStore) -> "ReaderPosition":
        return cls(docs.last_death(), manifest_stamp(path))

    def catch_up(self, path: Path, manifest: dict, segments: list[Segment], docs: DocStore, lock) -> Followed:
        """Costs one stat and one SQLite pragma when nothing was committed, both taken without
        `lock` (the store's), which searches need: only applying changes holds it."""
        stamp = manifest_stamp(path)
        if stamp != self.manifest_stamp:
            why = shape_change(path, manifest, segments)
            if why:
                return Followed(reopen=why)
            self.manifest_stamp = stamp
        version = docs.data_version()
        if version == self.data_version:
            return Followed()
        with lock:
            return self._apply(version, segments, docs)

    def _apply(self, version: int, segments: list[Segment], docs: DocStore) -> Followed:
        for seg in segments:
            if docs.epoch(seg.id) != seg.epoch:
                return Followed(reopen=f"segment {seg.id} was compacted")
        by_id = {seg.id: seg for seg in segments}
        changes = docs.changes_since(self.death_seq, {seg.id: len(seg.alive) for seg in segments if seg.faiss is not None})
        unknown = {seg_id for seg_id, _ in changes.deaths} - by_id.keys()
        if unknown:
            return Followed(reopen=f"the writer wrote to segment {min(unknown)}, which this reader has not opened")
        added = 0
        for seg_id, (vectors, codes, alive) in changes.rows.items():
            seg = by_id[seg_id]
            first = len(seg.alive)
            seg.grow(first + len(vectors))
            seg.alive[first:], seg.codes[first:] = alive, codes
            seg.append(vectors)
            added += len(vectors)
        for seg_id, row in changes.deaths:
            seg = by_id[seg_id]
            if row < len(seg.alive):
                seg.alive[row] = False
        self.death_seq, self.data_version = changes.death_seq, version
        return Followed(rows=added, deaths=len(changes.deaths))


def shape_change(path: Path, manifest: dict, segments: list[Segment]) -> str | None:
    """Why the manifest on disk no longer matches this reader's segments, or None."""
    try:
        disk = read_manifest(path)
    except IndexError_:
        return None  # being replaced this instant: look again next time
    if disk.get("active_version") != manifest.get("active_version"):
        return f"encoder version {disk.get('active_version')} was activated"
    mine = {s.id: s for s in segments}
    if [r["id"] for r in disk["segments"]] != list(mine):
        return "the writer added a segment"
    for rec in disk["segments"]:
        seg = mine[rec["id"]]
        if (rec.get("index") is None) != (seg.record.get("index") is None):
            return f"segment {seg.id} finished building"
        if seg.mapped and len(seg.tail) >= TAIL_REOPEN_ROWS and rec.get("faiss_file") != seg.record.get("faiss_file"):
            return f"segment {seg.id} has a checkpoint with the {len(seg.tail)} rows searched apart"
    return None
