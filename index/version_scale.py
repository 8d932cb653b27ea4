"""Scores of older segments on the active encoder's scale, so merged search compares like with like.

After an update, an old segment is searched with the query mapped by its compensator into the
old space, and its cosines are on the old encoder's scale: lit-base@1's best text->image
matches sit near 0.3, lit-base's near 0.6, so raw cosines bury every old document under the
new segment's. A scale is a per-(query modality, document modality) linear map from the old
segment's cosines onto the active encoder's, fitted on documents both encoders have embedded:
a sample of the old segment's own documents, embedded again by the active encoder, scored by
the same reference queries in both spaces (the compensated query against the stored vector,
the query against the new vector). Moment matching over each reference's top `TOP` scores
aligns where rankings are decided (a regression of one score on the other would shrink toward
the mean under noise).

What it guarantees: the map depends only on the two encoders and the old segment's documents,
never on the new segment, so a new segment of 10 documents is merged exactly as one of 10,000
would be, and within a segment the order of cosines is kept (the map is increasing). It makes
an old document score what the active encoder would give such a match; it cannot give the old
encoder knowledge it lacked (a concept v1 never learnt ranks as low merged as it did before).
"""
from __future__ import annotations

import math

import numpy as np

TOP = 20  # the top of each reference's ranking that the moments are matched over
ALL = "*"  # the map over every document modality of the segment
MIN_DOCUMENTS = 8  # fewer documents of a modality than this in the sample: no map of its own
KNEE = 0.9  # mapped cosines beyond +-KNEE are bent toward +-1, so scores stay within (-1, 1)


def doc_key(modalities: list[str] | None, present: list[str]) -> str:
    """Which map a search uses: its one document modality, else the segment's only one, else ALL."""
    if modalities and len(modalities) == 1:
        return modalities[0]
    return present[0] if len(present) == 1 else ALL


def fit(mapped_refs: np.ndarray, refs: np.ndarray, old_docs: np.ndarray, new_docs: np.ndarray,
        same_items: bool = False) -> tuple[float, float]:
    """(scale, offset) with `scale * old cosine + offset` ~ the active encoder's cosine.

    `mapped_refs` are `refs` through the compensator (old space); `old_docs` / `new_docs` the
    same documents in both spaces. `same_items`: the references are the first documents (image
    queries calibrated on the segment's own photos), so a reference's match with itself is left out.
    """
    x = mapped_refs @ old_docs.T
    y = refs @ new_docs.T
    if same_items:
        np.fill_diagonal(x, -np.inf)
        np.fill_diagonal(y, -np.inf)
    top = max(1, min(TOP, x.shape[1] - (1 if same_items else 0)))
    x = -np.partition(-x, top - 1, axis=1)[:, :top]
    y = -np.partition(-y, top - 1, axis=1)[:, :top]
    if x.std() < 1e-6:
        return 1.0, float(y.mean() - x.mean())
    scale = float(y.std() / x.std())
    return scale, float(y.mean() - scale * x.mean())


def bend(s: np.ndarray) -> np.ndarray:
    """Identity within [-KNEE, KNEE]; beyond, d -> KNEE + w d / (d + w) toward +-1 (w = 1 - KNEE):
    increasing, inside (-1, 1), and slow enough to tell a duplicate from a close match in float32."""
    s = np.asarray(s, dtype=np.float64)
    width = 1.0 - KNEE
    d = np.nan_to_num(np.maximum(np.abs(s) - KNEE, 0.0), posinf=1e30)  # -inf (no document) stays -1
    out = np.where(d > 0, np.sign(s) * (KNEE + width * d / (d + width)), s)
    return out.astype(np.float32)


def apply(scores: np.ndarray, scale: np.ndarray | float, offset: np.ndarray | float) -> np.ndarray:
    """Old-segment cosines (one row per query, with its (scale, offset)) on the active scale."""
    scale = np.asarray(scale, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    if scale.ndim == 1:
        scale, offset = scale[:, None], offset[:, None]
    raw = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(raw), bend(scale * raw + offset), -np.inf).astype(np.float32)


def valid(pair) -> bool:
    return pair is not None and len(pair) == 2 and all(math.isfinite(float(v)) for v in pair) and float(pair[0]) > 0
