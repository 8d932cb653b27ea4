"""Fitting the scales (index/version_scale.py) that put an older segment's scores on the active
encoder's scale: `umr update` fits them when it registers a version, and an engine fits them
on first use for a segment compensated before scales existed.

The documents both encoders embed are a sample of the old segment's own (stored vector on the
old side, a fresh embedding on the new); the reference queries are the new version's (umr's
generic queries for text, the segment's own sampled documents for image and image+text
queries where it holds such documents, else the update's calibration queries).
"""
from __future__ import annotations

import logging

import numpy as np

from umr.index import version_scale as vs
from umr.index.documents import MODALITY_CODES
from umr.index.store import IndexStore, Segment
from umr.retrieval.encoders import Encoder
from umr.retrieval.update.generic_queries import generic_queries
from umr.retrieval.items import stored_item

log = logging.getLogger("umr.retrieval")

SAMPLE = 256  # documents per modality embedded again by the active encoder
GENERIC_TEXTS = 2000


def document_sample(store: IndexStore, seg: Segment, encoder: Encoder, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Document modality -> (stored vectors, the same documents embedded by `encoder`) for up to
    SAMPLE live documents each; documents whose image can no longer be read are left out."""
    rng = np.random.default_rng(seed)
    out = {}
    for modality, code in MODALITY_CODES.items():
        if modality not in encoder.query_modalities:
            continue
        rows = np.flatnonzero((seg.codes == code) & seg.alive)
        if len(rows) > SAMPLE:
            rows = np.sort(rng.choice(rows, SAMPLE, replace=False))
        docs = store.docs.docs_at(seg.id, rows.tolist(), seg.epoch)
        if len(docs) < vs.MIN_DOCUMENTS:
            continue
        kept = np.array(sorted(docs))
        new, ok = _embed(encoder, [stored_item(store.path, docs[r]) for r in kept])
        if ok.sum() >= vs.MIN_DOCUMENTS:
            out[modality] = (store.docs.vectors_at(seg.id, kept[ok]), new[ok])
    return out


def _embed(encoder: Encoder, items: list) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and which items embedded: a batch that fails (a moved image) is retried item
    by item so that one unreadable file does not cost the whole sample."""
    try:
        return encoder.encode(items, role="document"), np.ones(len(items), dtype=bool)
    except Exception:  # noqa: BLE001 - any unreadable item: find which
        vecs, ok = [], []
        for it in items:
            try:
                vecs.append(encoder.encode([it], role="document")[0])
                ok.append(True)
            except Exception:  # noqa: BLE001
                vecs.append(np.zeros(encoder.dim, dtype=np.float32))
                ok.append(False)
        return np.stack(vecs), np.asarray(ok)


def fit_segment(store: IndexStore, seg: Segment, encoder: Encoder, compensators: dict, references: dict[str, np.ndarray],
                seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Query modality -> {document key: [scale, offset]} for every compensated query modality."""
    docs = document_sample(store, seg, encoder, seed)
    if not docs:
        return {}
    out: dict[str, dict[str, list[float]]] = {}
    for qm, comp in compensators.items():
        if qm in docs:  # the segment's own documents of the query's modality play the queries
            refs, same = docs[qm][1], True
        elif qm == "text":
            refs, same = references.get("text"), False
            if refs is None:
                refs = encoder.encode_texts(list(generic_queries(GENERIC_TEXTS)))
        else:
            refs, same = references.get(qm), False
        if refs is None or len(refs) < vs.MIN_DOCUMENTS:
            continue
        mapped = comp.apply(refs)
        maps = {}
        for dm, (old, new) in docs.items():
            maps[dm] = list(vs.fit(mapped, refs, old, new, same_items=same and dm == qm))
        # Pooled: the references against every sampled document at once (a search over all
        # modalities, or over one with too few documents for a map of its own).
        if len(docs) == 1:
            maps[vs.ALL] = next(iter(maps.values()))
        else:  # the query modality's own documents first, so a reference's match with itself is the diagonal
            order = sorted(docs, key=lambda dm: dm != qm)
            old_all = np.concatenate([docs[dm][0] for dm in order])
            new_all = np.concatenate([docs[dm][1] for dm in order])
            maps[vs.ALL] = list(vs.fit(mapped, refs, old_all, new_all, same_items=same))
        out[qm] = {k: [round(v[0], 6), round(v[1], 6)] for k, v in maps.items()}
        log.info("segment %d, %s queries: scores mapped onto the active encoder's scale (%s)", seg.id, qm,
                 ", ".join(f"{k}: {v[0]:.3f} x + {v[1]:+.3f}" for k, v in out[qm].items()), extra={"segment": seg.id})
    return out
