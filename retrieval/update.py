"""Registering a new encoder on an index without re-embedding it: fit one compensator per
(older segment, query modality) from calibration pairs, then activate the new version.

Calibration pairs are the same items embedded by the segment's encoder and by the new one.
From the corpus itself (the default) the old side is free: it is the stored vector.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from index.store import IndexStore, Segment
from retrieval import compensators as cp
from retrieval.encoders import Encoder, load_recorded
from retrieval.items import Item, stored_item

MIN_PAIRS = 20
CORPUS_SAMPLE_FOR_AGREEMENT = 20_000


def corpus_pairs(store: IndexStore, seg: Segment, new: Encoder, per_modality: int, seed: int = 0):
    """(modality -> (new vectors, old vectors)) from the segment's own stored documents."""
    rng = np.random.default_rng(seed)
    by_mod: dict[str, list] = defaultdict(list)
    for doc in store.docs.iter_docs(seg.id):
        by_mod[doc.modality].append(doc)
    out = {}
    for modality, docs in by_mod.items():
        if len(docs) > per_modality:
            docs = [docs[i] for i in sorted(rng.choice(len(docs), per_modality, replace=False))]
        found = {d.id: store.docs.get(d.id) for d in docs}
        rows = np.array([found[d.id][2] for d in docs])
        old = store.docs.vectors_at(seg.id, rows)
        new_vecs = new.encode([stored_item(store.path, d) for d in docs], role="document")
        out[modality] = (new_vecs, old)
    return out


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def passages(text: str | None, min_words: int = 4, max_words: int = 40) -> list[str]:
    """The sentences of a multi-sentence text, the size of a query. A one-sentence text (a
    caption) yields nothing: it is already calibrated as the document itself."""
    if not text:
        return []
    found = [s.strip() for s in _SENTENCE_END.split(text) if min_words <= len(s.split()) <= max_words]
    return found if len(found) >= 2 else []


def passage_pairs(store: IndexStore, seg: Segment, old: Encoder, new: Encoder, limit: int, seed: int = 0):
    """Query-sized calibration from the corpus: sentences of the segment's stored texts,
    embedded by both encoders. Queries are short and documents long; a map fitted on whole
    documents alone transfers less well to queries (bench/continual_text.py: Cranfield
    abstracts vs its questions, 85% of the gap recovered from documents, 97% with passages)."""
    found = [p for doc in store.docs.iter_docs(seg.id) for p in passages(doc.text)]
    if not found:
        return {}
    rng = np.random.default_rng(seed)
    if len(found) > limit:
        found = [found[i] for i in sorted(rng.choice(len(found), limit, replace=False))]
    items = [Item(None, t) for t in found]
    return {"text": (new.encode(items, role="query"), old.encode(items, role="query"))}


def segment_encoder(seg: Segment) -> Encoder:
    """The encoder a segment was embedded with, refusing one whose weights have changed since."""
    enc = load_recorded(seg.record["encoder"])
    if enc.fingerprint != seg.record["encoder"]["fingerprint"]:
        raise ValueError(f"segment {seg.id}'s encoder {seg.record['encoder']['spec']} no longer loads "
                         "with the same weights; calibrate from the corpus instead")
    return enc


def file_pairs(path: str, old: Encoder, new: Encoder, limit: int):
    """Queries from a JSONL file ({"text", "image"} per line, image paths relative to it)."""
    base = Path(path).parent
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        text = rec.get("text") or rec.get("query_txt")
        img = rec.get("image") or rec.get("query_img_path")
        items.append(Item(None, text, str(base / img) if img else None))
        if len(items) >= limit:
            break
    by_mod: dict[str, list] = defaultdict(list)
    for it in items:
        by_mod[it.modality].append(it)
    return {m: (new.encode(its, role="query"), old.encode(its, role="query")) for m, its in by_mod.items()}


class UpdateRefused(ValueError):
    """The chosen compensators retrieve worse than the old encoder on --eval; nothing was changed."""


def read_eval_queries(path: str) -> tuple[list[Item], list[set[str]]]:
    """M-BEIR query JSONL (query_txt, query_img_path, pos_cand_list) or {"text", "image", "relevant"}."""
    from retrieval.readers import mbeir_image_root

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
        raise ValueError(f"no queries in {path}")
    return items, relevant


def _hits(store: IndexStore, queries: dict[int, np.ndarray], relevant, k: int) -> np.ndarray:
    """Per query: did a relevant document reach the top k."""
    hits = store.search(queries, k)
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


def _uncovered_eval_modalities(eval_path: str, segments: list[dict]) -> str:
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
    """Recall@k of the whole index for the old encoders, the new one uncompensated, each
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
    out = {"queries": len(items), f"recall@{k}": {}}
    r = out[f"recall@{k}"]
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
    from index.vector_index import exact_topk

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
    for seg_id in {w[1] for w in where}:
        cols = np.array([i for i, w in enumerate(where) if w[1] == seg_id])
        vecs = store.docs.vectors_at(seg_id, np.array([where[i][2] for i in cols]))
        old_scores[:, cols] = old_q[seg_id] @ vecs.T

    def recall(scores_or_q, vecs=None):
        if vecs is None:
            top = np.argsort(-scores_or_q, axis=1)[:, :k]
        else:
            top = exact_topk(scores_or_q, vecs, k)[1]
        return float(np.mean([bool(set(ids[t]) & rel) for t, rel in zip(top, relevant)]))

    return {"documents": len(sample), f"old encoders on the sample": recall(old_scores),
            f"new encoder re-indexed on the sample": recall(new_q, new_vecs)}


def fit_update(store: IndexStore, new: Encoder, calibration: list[str] | None = None, method: str = "auto",
               per_modality: int = 2000, activate: bool = True, seed: int = 0, eval_path: str | None = None,
               force: bool = False, reindex_sample: int | None = None) -> dict:
    default = not calibration
    calibration = calibration or ["corpus", "passages"]
    t0 = time.perf_counter()
    report = {"encoder": new.spec, "fingerprint": new.fingerprint, "calibration": calibration, "segments": []}
    fitted, pairs_of = [], {}
    for seg in list(store.segments):
        seg_version = seg.record["encoder"].get("version", 1)
        if seg.record["encoder"]["fingerprint"] == new.fingerprint or len(seg.alive) == 0:
            continue
        pairs: dict[str, list] = defaultdict(list)
        notes = []
        old_encoder = None
        for src in calibration:
            if src == "corpus":
                got = corpus_pairs(store, seg, new, per_modality, seed)
            else:
                if old_encoder is None:
                    try:
                        old_encoder = segment_encoder(seg)
                    except Exception as e:
                        if not (default and src == "passages"):
                            raise ValueError(str(e)) from None
                        # The default asks for passages only where the old encoder still loads.
                        notes.append(f"passages skipped: {e}")
                        continue
                if src == "passages":
                    got = passage_pairs(store, seg, old_encoder, new, per_modality, seed)
                else:
                    got = file_pairs(src, old_encoder, new, per_modality)
            for m, (n_vecs, o_vecs) in got.items():
                pairs[m].append((n_vecs, o_vecs))
        alive = np.flatnonzero(seg.alive)
        sample = alive if len(alive) <= CORPUS_SAMPLE_FOR_AGREEMENT else np.sort(
            np.random.default_rng(seed).choice(alive, CORPUS_SAMPLE_FOR_AGREEMENT, replace=False))
        corpus = store.docs.vectors_at(seg.id, sample)
        seg_report = {"segment": seg.id, "segment_version": seg_version, "modalities": {}, "notes": notes}
        for modality in ("text", "image", "image,text"):
            if modality not in pairs:
                seg_report["modalities"][modality] = {"status": "no calibration data: these queries are refused for this segment"}
                continue
            n_vecs = np.concatenate([p[0] for p in pairs[modality]])
            o_vecs = np.concatenate([p[1] for p in pairs[modality]])
            if len(n_vecs) < MIN_PAIRS:
                seg_report["modalities"][modality] = {"status": f"only {len(n_vecs)} pairs (need {MIN_PAIRS}): refused"}
                continue
            kinds = cp.KINDS if method == "auto" else (method,)
            comp, table = cp.select(n_vecs, o_vecs, corpus, kinds=kinds, seed=seed)
            sub = np.random.default_rng(seed).permutation(len(n_vecs))[:512]
            comp.params["score_map"] = cp.fit_score_map(comp.apply(n_vecs[sub]), o_vecs[sub], n_vecs[sub], n_vecs[sub])
            fitted.append((seg, modality, comp, table, len(n_vecs)))
            pairs_of[(seg.id, modality)] = (n_vecs, o_vecs)
            seg_report["modalities"][modality] = {"status": "ok", "chosen": comp.kind, "pairs": int(len(n_vecs)),
                                                  "comparison": table}
        report["segments"].append(seg_report)
    blind = [r["segment"] for r in report["segments"] if not any(m["status"] == "ok" for m in r["modalities"].values())]
    if blind and activate and not force:
        # Activating would leave those segments unsearchable: every query would be refused there.
        raise UpdateRefused(f"not activated: no query modality of segment(s) {', '.join(map(str, blind))} has enough "
                            f"calibration pairs (need {MIN_PAIRS}); add --calibration QUERIES.jsonl, register only with "
                            "--no-activate, or --force")
    if eval_path:
        uncovered = _uncovered_eval_modalities(eval_path, report["segments"])
        if uncovered and not force:
            # Scoring those queries would compare the compensators on queries none of them can map.
            raise UpdateRefused(f"not activated: the --eval queries include {uncovered}, for which there is no calibration "
                                "data; add --calibration QUERIES.jsonl with queries of that kind, or --force")
        report["eval"] = evaluate_variants(store, new, fitted, pairs_of, eval_path, reindex_sample=reindex_sample)
        r = report["eval"]["recall@5"]
        cmp = report["eval"]["chosen against old"]
        if cmp["interval95"][1] < 0 and not force:  # worse beyond what the choice of queries explains
            figures = ", ".join(f"{k} {v:.3f}" for k, v in r.items())
            raise UpdateRefused(f"not activated: with the chosen compensators Recall@5 on {eval_path} is "
                                f"{r['chosen']:.3f}, below the old encoder's {r['old encoders']:.3f} beyond the noise "
                                f"({describe_interval(cmp)}; {figures}); use --force to register it anyway")
    # Only now is anything written: a refused update leaves the index as it was.
    version = store.register_version(new.record())
    report["version"] = version
    for seg, modality, comp, table, n in fitted:
        name = f"v{version}-{modality.replace(',', '+')}"
        rel = f"segments/{seg.id}/compensators"
        files = comp.save(store.path / rel, name)
        store.set_compensator(seg.id, version, modality, {
            "kind": comp.kind, "dir": rel, "name": name, "files": files, "pairs": int(n),
            "score_map": comp.params["score_map"],
            "comparison": table, "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    report["seconds"] = round(time.perf_counter() - t0, 3)
    store.record_event("update", version=version, fingerprint=new.fingerprint, calibration=calibration,
                       method=method, report=report["segments"], eval=report.get("eval"))
    if activate:
        store.activate(version)
    else:
        store.save()
    report["active_version"] = store.active_version
    return report
