"""Each segment's fitted modality calibration (index/modality_calibration.py), kept until the
segment has grown or shrunk enough to refit, and the choice of which queries get it.

Its own object because the store, the search merge and `umr index info` all ask it, and the
fit itself searches the segment (index/segment_search.py) with its own documents as queries."""
from __future__ import annotations

import threading

import numpy as np

from umr.index import modality_calibration as mc
from umr.index.documents import MODALITY_CODES
from umr.index.docstore import DocStore
from umr.index.segment import Segment
from umr.index.segment_search import search_segment


class CalibrationCache:
    def __init__(self, docs: DocStore, lock: threading.RLock):
        self.docs = docs
        self.lock = lock  # the store's: a fit reads rows that adds and compactions change
        self._fitted: dict[int, mc.ModalityCalibration] = {}

    def modality_counts(self, seg: Segment) -> dict[str, int]:
        """Live documents per modality (those with any). Asked on every search over several
        modalities or encoder versions, so kept until the segment's rows or deletions change
        (rows are only appended and deleted, never revived; compaction makes new arrays)."""
        key = (id(seg.alive), len(seg.alive), int(seg.alive.sum()))
        if seg.modality_counts is None or seg.modality_counts[0] != key:
            counts = {m: int(((seg.codes == c) & seg.alive).sum()) for m, c in MODALITY_CODES.items()}
            seg.modality_counts = (key, {m: n for m, n in counts.items() if n})
        return seg.modality_counts[1]

    def present_modalities(self, seg: Segment) -> list[str]:
        return list(self.modality_counts(seg))

    def of(self, seg: Segment) -> mc.ModalityCalibration | None:
        """The segment's score calibration, refitted when the segment has grown or shrunk
        enough since (and then recorded in its manifest record); None while it is empty."""
        with self.lock:
            alive = int(seg.alive.sum())
            if alive == 0 or seg.faiss is None:
                return None
            cal = self._fitted.get(seg.id)
            if cal is None and seg.record.get("calibration"):
                cal = mc.ModalityCalibration.from_record(seg.record["calibration"])
            if cal is None or cal.stale(alive, self.modality_counts(seg)):
                cal = self._fit(seg, alive)
                seg.record["calibration"] = cal.to_record()
            self._fitted[seg.id] = cal
            return cal

    def pairs(self, seg: Segment) -> list[str]:
        """The query>document pairs a search over several of the segment's modalities is
        calibrated for, as they will be at the next search (fitted now where stale)."""
        if len(self.present_modalities(seg)) < 2:
            return []
        cal = self.of(seg)
        return sorted(cal.tables) if cal is not None else []

    def _fit(self, seg: Segment, alive: int, seed: int = 0) -> mc.ModalityCalibration:
        rng = np.random.default_rng(seed)
        present = self.present_modalities(seg)
        best: dict[tuple[str, str], np.ndarray] = {}
        counts = {m: np.flatnonzero((seg.codes == MODALITY_CODES[m]) & seg.alive) for m in present}
        enough = [m for m in present if len(counts[m]) >= mc.MIN_DOCUMENTS]
        for qm in enough:
            rows = counts[qm]
            rows = np.sort(rng.choice(rows, min(mc.PSEUDO_QUERIES, len(rows)), replace=False))
            q = np.ascontiguousarray(self.docs.vectors_at(seg.id, rows), dtype=np.float32)
            for dm in enough:
                scores, hits = search_segment(seg, self.docs, q, 2, [dm])
                own = hits[:, 0] == rows  # a pseudo-query finds itself first: its best match is the next
                b = np.where(own, scores[:, 1], scores[:, 0])
                best[(qm, dm)] = b[np.isfinite(b)]
        return mc.fit_pairs(best, alive, present)

    def groups(self, segments: list[Segment], query_modalities: list[str] | None,
               modalities: list[str] | None) -> dict[str, list[tuple[Segment, list[str]]]]:
        """Per query modality that gets calibrated scores: each segment with the document
        modalities it is searched for. A query modality is calibrated only when more than one
        document modality is searched and every segment has tables for all of them; otherwise
        its scores stay raw cosines, so one answer never mixes the two scales."""
        if not query_modalities:
            return {}
        wanted = [(seg, [m for m in self.present_modalities(seg) if not modalities or m in modalities])
                  for seg in segments]
        if len({m for _, ms in wanted for m in ms}) < 2:
            return {}
        out = {}
        cals = [self.of(seg) for seg, _ in wanted]
        for qm in set(query_modalities):
            if all(c is not None and c.covers(qm, ms) for c, (_, ms) in zip(cals, wanted)):
                out[qm] = wanted
        return out

