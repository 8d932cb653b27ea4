"""Scores that compare across modalities, for corpora of images and texts together.

Raw cosines do not: with lit-base a caption query meets other captions at 0.6 to 0.9 and its
photo at 0.3 to 0.5 (the modality gap), so on a mixed pool text->image Recall@5 falls from 0.59
to 0.005. A calibrated score puts each candidate on the scale of the matches the corpus itself
makes: for a query of modality Q and a document of modality D, the share of the corpus' own
Q items whose best D match (themselves excluded) scores lower. A photo as close to a caption as
a typical photo's best caption is scores like a caption as close as a typical caption's best
caption. Monotone per modality pair, so rankings within a modality never change; fitted from
the segment's own documents (no labels), stored in the manifest, refitted as the corpus grows.
Measured on flickr8k-1k's mixed test pool: docs/zero-shot.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS = 101  # quantiles of the best-match scores per modality pair
PSEUDO_QUERIES = 256  # corpus items per modality that play the queries
# A table needs this many documents of both its modalities: with fewer, best matches say more
# about which documents happen to be there than about the modality gap (12 notes beside 100
# photos: calibrated caption->photo@1 0.26 against 0.34 by raw cosine; 48 notes: 0.32 against 0.18),
# and searches over that modality pair keep raw cosines.
MIN_DOCUMENTS = 32
REFIT_GROWTH = 1.5  # refit when the segment has grown or shrunk by this factor since the fit
EDGE = 0.01  # the share of [0, 1] given to cosines below and above the fitted range


def pair_key(query_modality: str, doc_modality: str) -> str:
    return f"{query_modality}>{doc_modality}"


@dataclass
class ModalityCalibration:
    tables: dict[str, np.ndarray]  # pair_key -> POINTS increasing quantiles of best-match scores
    fitted_on: int  # alive documents when fitted
    present: list[str] | None = None  # the document modalities the segment held when fitted

    def covers(self, query_modality: str, doc_modalities: list[str]) -> bool:
        return all(pair_key(query_modality, d) in self.tables for d in doc_modalities)

    def apply(self, scores: np.ndarray, query_modality: str, doc_modality: str) -> np.ndarray:
        """A score in [0, 1], increasing in the cosine: EDGE + (1 - 2 EDGE) x the quantile inside
        the fitted range; below and above it the cosine's distance to the range's ends fills
        the bottom and top EDGE linearly, so a duplicate (cosine 1) still outranks a merely
        typical best match, and nothing leaves [0, 1]."""
        t = self.tables[pair_key(query_modality, doc_modality)]
        s = np.asarray(scores, dtype=np.float64)
        inside = EDGE + (1.0 - 2 * EDGE) * np.interp(s, t, np.linspace(0.0, 1.0, len(t)))
        above = 1.0 - EDGE * (1.0 - s) / max(1.0 - t[-1], 1e-9)
        below = EDGE * (s + 1.0) / max(t[0] + 1.0, 1e-9)
        out = np.where(s > t[-1], above, np.where(s < t[0], below, inside))
        return np.where(np.isfinite(s), np.clip(out, 0.0, 1.0), -np.inf).astype(np.float32)

    def stale(self, alive: int, counts: dict[str, int] | None = None) -> bool:
        """Refit when the segment has grown or shrunk by REFIT_GROWTH, holds another set of
        modalities (`counts`: live documents per modality) than when fitted, or now holds enough
        documents of a modality that no table covers yet."""
        if not self.fitted_on / REFIT_GROWTH <= alive <= self.fitted_on * REFIT_GROWTH:
            return True
        if counts is None:
            return False
        seen = set(self.present) if self.present is not None else {k.split(">")[1] for k in self.tables}
        covered = {k.split(">")[1] for k in self.tables}
        return set(counts) != seen or any(n >= MIN_DOCUMENTS and m not in covered for m, n in counts.items())

    def to_record(self) -> dict:
        return {"fitted_on": self.fitted_on, "points": POINTS, "present": self.present,
                "tables": {k: [round(float(x), 6) for x in v] for k, v in self.tables.items()}}

    @classmethod
    def from_record(cls, rec: dict) -> "ModalityCalibration":
        return cls({k: np.asarray(v, dtype=np.float64) for k, v in rec["tables"].items()}, int(rec["fitted_on"]),
                   rec.get("present"))


def table(best_scores: np.ndarray) -> np.ndarray:
    """Strictly increasing quantiles (ties nudged apart so interpolation stays defined)."""
    q = np.quantile(np.asarray(best_scores, dtype=np.float64), np.linspace(0.0, 1.0, POINTS))
    return q + np.arange(POINTS) * 1e-9


def fit_pairs(best_by_pair: dict[tuple[str, str], np.ndarray], fitted_on: int,
              present: list[str] | None = None) -> ModalityCalibration:
    """From each (query modality, document modality)'s best-match scores of the pseudo-queries
    (the caller leaves out modalities with fewer than MIN_DOCUMENTS documents)."""
    return ModalityCalibration({pair_key(q, d): table(s) for (q, d), s in best_by_pair.items() if len(s)},
                               fitted_on, present)


def fit_dense(vectors: np.ndarray, modalities: np.ndarray, seed: int = 0) -> ModalityCalibration:
    """The same fit over vectors held in memory (evaluation over a whole pool)."""
    rng = np.random.default_rng(seed)
    modalities = np.asarray(modalities)
    best: dict[tuple[str, str], np.ndarray] = {}
    present = sorted(set(modalities.tolist()))
    enough = [m for m in present if (modalities == m).sum() >= MIN_DOCUMENTS]
    for qm in enough:
        rows = np.flatnonzero(modalities == qm)
        rows = np.sort(rng.choice(rows, min(PSEUDO_QUERIES, len(rows)), replace=False))
        for dm in enough:
            cols = np.flatnonzero(modalities == dm)
            s = vectors[rows] @ vectors[cols].T
            s[rows[:, None] == cols[None, :]] = -np.inf
            if s.shape[1] > (qm == dm):
                best[(qm, dm)] = s.max(axis=1)
    return fit_pairs(best, len(vectors), present)
