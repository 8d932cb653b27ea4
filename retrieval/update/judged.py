"""What `umr update --eval` measures before anything is written: hit rate@k (M-BEIR's Recall@k) of the whole index
for the old encoders, the new one uncompensated, each compensator kind, the chosen ones, and
the new encoder re-indexed on a sample, with a paired interval for the chosen against the old.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore
from umr.retrieval.update import compensators as cp
from umr.retrieval.encoders import Encoder, load_recorded
from umr.retrieval.items import Item, stored_item
from umr.index.search_plan import SearchPlan


def read_eval_queries(path: str) -> tuple[list[Item], list[set[str]]]:
    """M-BEIR query JSONL (query_txt, query_img_path, pos_cand_list) or {"text", "image", "relevant"}."""
    from umr.retrieval.corpus.readers import mbeir_image_root

    p = Path(path)
    root = mbeir_image_root(p) if "query_txt" in p.read_text()[:2000] else p.parent
    items, relevant = [], []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        text = rec.get("query_txt", rec.get("text"))
        img = rec.get("query_img_path", rec.get("image"))
        rel = rec.get("pos_cand_list", rec.get("relevant")) or []
        items.append(Item(None, text, str(root / img) if img else None))
        relevant.append(set(map(str, rel)))
    if not items:
        raise InvalidArgument(f"no queries in {path}")
    return items, relevant


def _hits(store: IndexStore, queries: dict[int, np.ndarray], relevant, k: int) -> np.ndarray:
    """Per query: did a relevant document reach the top k."""
    hits = store.search(SearchPlan(queries, k))
    return np.array([any(h.id in rel for h in hs) for hs, rel in zip(hits, relevant)], dtype=bool)


def _recall(store: IndexStore, queries: dict[int, np.ndarray], relevant, k: int) -> float:
    return float(np.mean(_hits(store, queries, relevant, k)))


def paired_interval(before: np.ndarray, after: np.ndarray, level: float = 0.95, resamples: int = 4000,
                    seed: int = 0) -> dict:
    """The difference in hit rate (after - before) over the same queries and its paired
    bootstrap interval: queries are resampled, each keeping both of its outcomes, so the noise
    of which queries happen to be in the file is in the interval and the shared part is not."""
    d = after.astype(np.float64) - before.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(d.mean()), f"interval{round(level * 100)}": [float(lo), float(hi)],
            "queries": int(len(d)), "changed": int(np.count_nonzero(d))}


def uncovered_eval_modalities(eval_path: str, segments: list[dict]) -> str:
    """'text queries (segment 0)' for eval query modalities some compensated segment has no map for."""
    items, _ = read_eval_queries(eval_path)
    wanted = sorted({it.modality for it in items})
    missing = [(m, seg["segment"]) for seg in segments for m in wanted if seg["modalities"].get(m, {}).get("status") != "ok"]
    return "; ".join(f"{m} queries (segment {s})" for m, s in missing)


def describe_interval(cmp: dict) -> str:
    lo, hi = cmp["interval95"]
    return (f"difference {cmp['difference']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}] by paired bootstrap over "
            f"{cmp['queries']} queries, {cmp['changed']} of which changed")


def evaluate_variants(store: IndexStore, new: Encoder, fitted: list, pairs_of: dict, eval_path: str, k: int = 5,
                      reindex_sample: int | None = None) -> dict:
    """Hit rate@k of the whole index for the old encoders, the new one uncompensated, each
    compensator kind, and the chosen compensators: the comparison `umr update` prints."""
    items, relevant = read_eval_queries(eval_path)
    mods = np.array([it.modality for it in items])
    new_q = new.encode(items, role="query")
    old_q = {}
    for seg in store.segments:
        if len(seg.alive):
            enc = load_recorded(seg.record["encoder"])
            old_q[seg.id] = enc.encode(items, role="query")
    segs = [s for s in store.segments if len(s.alive)]
    out = {"queries": len(items), f"hit_rate@{k}": {},
           "judged_in_index": sum(any(store.docs.get(d) is not None for d in rel) for rel in relevant)}
    r = out[f"hit_rate@{k}"]
    old_hits = _hits(store, old_q, relevant, k)
    r["old encoders"] = float(old_hits.mean())
    if all(s.dim == new.dim for s in segs):
        r["new, uncompensated"] = _recall(store, {s.id: new_q for s in segs}, relevant, k)

    def mapped_with(choose) -> dict[int, np.ndarray]:
        out_q = {}
        for s in segs:
            q = np.zeros((len(items), s.dim), dtype=np.float32)
            for m in set(mods):
                rows = np.flatnonzero(mods == m)
                comp = choose(s.id, m)
                if comp is not None:
                    q[rows] = comp.apply(new_q[rows])
            out_q[s.id] = q
        return out_q

    chosen = {(seg.id, m): comp for seg, m, comp, *_ in fitted}
    for kind in cp.KINDS[1:]:
        cache = {}

        def fit_kind(seg_id, m, kind=kind, cache=cache):
            if (seg_id, m) not in pairs_of:
                return None
            if (seg_id, m) not in cache:
                try:
                    cache[(seg_id, m)] = cp.make(kind).fit(*pairs_of[(seg_id, m)])
                except ValueError:
                    cache[(seg_id, m)] = None
            return cache[(seg_id, m)]

        if all(fit_kind(seg_id, m) is None for seg_id, m in pairs_of):
            continue  # e.g. a shift or rotation between encoders of different widths: not a candidate
        r[kind] = _recall(store, mapped_with(fit_kind), relevant, k)
    chosen_hits = _hits(store, mapped_with(lambda seg_id, m: chosen.get((seg_id, m))), relevant, k)
    r["chosen"] = float(chosen_hits.mean())
    out["chosen against old"] = paired_interval(old_hits, chosen_hits)
    if reindex_sample:
        out["reindex_sample"] = _reindexed_sample(store, new, new_q, old_q, relevant, reindex_sample, k)
    return out


def _reindexed_sample(store: IndexStore, new: Encoder, new_q, old_q, relevant, n: int, k: int, seed: int = 0) -> dict:
    """What re-indexing would buy, estimated on a sample: the judged documents plus `n` others,
    re-embedded by the new encoder, against the same sample as the old encoders stored it."""
    from umr.index.vector_index import exact_topk

    wanted = set().union(*relevant)
    docs = list(store.docs.iter_docs())
    judged = [d for d in docs if d.id in wanted]
    others = [d for d in docs if d.id not in wanted]
    pick = np.random.default_rng(seed).permutation(len(others))[:n]
    sample = judged + [others[i] for i in pick]
    ids = np.array([d.id for d in sample])
    new_vecs = new.encode([stored_item(store.path, d) for d in sample], role="document")
    old_scores = np.full((len(new_q), len(sample)), -np.inf, dtype=np.float32)
    where = [store.docs.get(d.id) for d in sample]
    epochs = {seg.id: seg.epoch for seg in store.segments}
    for seg_id in {w[1] for w in where}:
        cols = np.array([i for i, w in enumerate(where) if w[1] == seg_id])
        vecs = store.docs.vectors_at(seg_id, np.array([where[i][2] for i in cols]))
        store.docs.check_numbering(seg_id, epochs[seg_id])  # `get` numbers rows as the store does now
        old_scores[:, cols] = old_q[seg_id] @ vecs.T

    def recall(scores_or_q, vecs=None):
        if vecs is None:
            top = np.argsort(-scores_or_q, axis=1)[:, :k]
        else:
            top = exact_topk(scores_or_q, vecs, k)[1]
        return float(np.mean([bool(set(ids[t]) & rel) for t, rel in zip(top, relevant)]))

    return {"documents": len(sample), "old encoders on the sample": recall(old_scores),
            "new encoder re-indexed on the sample": recall(new_q, new_vecs)}


