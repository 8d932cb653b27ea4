"""`--target-recall`: search parameters picked on the index's own vectors, as autofaiss does.

Why measured and not derived: recall at a given nprobe, refine depth or efSearch depends on how
the corpus clusters (at 10M x 256 the defaults gave 0.897 recall@10 on clustered vectors and
far more than that costs on others). So a sample of the segment's own vectors is held back: searched
as queries, with every sampled row left out of the answers and of the exact truth (an ID
selector), so they stand for queries the index has never seen (leaving out only each query's
own row measured 0.95 where held-out queries got 0.89), and the cheapest setting whose
recall@k reaches the target is recorded in the segment's index parameters: every process that
opens the index searches with it.

A setting counts as reaching the target only when its measured recall minus one standard error
of that mean does: the sample is finite, and a setting that scrapes past the target on it
misses it about half the time on new queries (at 10M x 256 the cheapest bare pass measured
0.956 on 200 queries, a margin smaller than its own standard error).

A setting is then confirmed on a second held-back sample of the same size that played no part
in choosing it: picking the cheapest of many settings that pass on one sample favours those that
passed by luck (at 10M x 256 a setting chosen at 0.958 on 400 vectors, margin included, gave
0.943 on 1,000 fresh queries). The confirmed figure is the one recorded; where the cheapest
setting does not confirm, the next is tried, each with deeper re-scoring if need be.

Cheapest is measured too: for each nprobe (IVF-PQ) the smallest refine depth that reaches the
target, each such pair timed one query at a time; for HNSW the smallest efSearch. One FAISS
search per nprobe at the deepest refine gives every depth's recall, since a shallower depth
re-scores a prefix of the same PQ-ranked candidates.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from umr.index import vector_index as vi
from umr.index.errors import InvalidArgument
from umr.index.segment_search import search_segment

SAMPLE_QUERIES = 400
TIMED_QUERIES = 50
NPROBES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
REFINES = (1, 2, 4, 6, 10, 16, 25, 40)
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TRUTH_CHUNK = 65_536  # rows read at once for the exact truth: 64 MB as float32 at 256-d


@dataclass
class Tuning:
    """What --target-recall found for one segment, kept in its index record as "tuned"."""

    target: float
    k: int
    queries: int
    recall: float  # of the setting chosen
    reached: bool  # recall - recall_se >= target
    recall_se: float  # standard error of that mean over the sample
    params: dict  # the setting chosen (merged into the segment's index parameters)
    ms_per_query: float  # one query at a time, in the process that tuned
    tried: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_target(target: float | None) -> float | None:
    if target is not None and not 0 < target <= 1:
        raise InvalidArgument(f"--target-recall must lie in (0, 1], got {target}")
    return target


def exact_truth(store, seg, allowed: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Each query's exact top-k among the `allowed` rows: a scan of the segment's vectors."""
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for first, vecs in store.docs.iter_vectors(seg.id, chunk=TRUTH_CHUNK):
        s, i = vi.exact_topk(q, vecs, k, allowed[first:first + len(vecs)])
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate([best_i, np.where(i >= 0, i + first, -1)], 1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, order, 1), np.take_along_axis(i_all, order, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean recall@k over the queries, and the standard error of that mean."""
    hits = np.array([len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
                     for f, t in zip(found, truth)])
    return float(hits.mean()), float(hits.std(ddof=1) / np.sqrt(len(hits))) if len(hits) > 1 else 0.0


def reaches(measured: tuple[float, float], target: float) -> bool:
    mean, se = measured
    return mean - se >= target


def tune_segment(store, seg, target: float, k: int = 10, sample: int = SAMPLE_QUERIES, seed: int = 0) -> Tuning:
    """Choose and record the segment's search parameters (see the module docstring)."""
    check_target(target)
    choice = seg.choice
    if choice.kind not in TUNERS:
        raise InvalidArgument(f"--target-recall: no tuning is known for index kind {choice.kind!r}")
    live = np.flatnonzero(seg.alive)
    if len(live) <= k + 1:
        raise InvalidArgument(f"segment {seg.id} has {len(live)} documents: too few to measure recall@{k}")
    drawn = np.random.default_rng(seed).choice(live, min(2 * sample, len(live) - k - 1), replace=False)
    half = (len(drawn) + 1) // 2
    pick_rows, check_rows = np.sort(drawn[:half]), np.sort(drawn[half:])  # choose on one, confirm on the other
    rows = np.concatenate([pick_rows, check_rows])
    q_all = np.ascontiguousarray(store.docs.vectors_at(seg.id, rows), dtype=np.float32)
    allowed = seg.alive[: int(seg.faiss.ntotal)].copy()
    allowed[rows] = False  # held back: the samples are queries, never answers
    # A scanned kind answers exactly: its truth would be a second scan of the whole segment for nothing.
    truth_all = (np.full((len(rows), k), -1, dtype=np.int64) if choice.traits.scanned
                 else exact_truth(store, seg, allowed, q_all, k))
    pick = Sample(q_all[:half], truth_all[:half])
    check = Sample(q_all[half:], truth_all[half:]) if len(check_rows) else pick
    tuning = TUNERS[choice.kind](store, seg, allowed, pick, check, target, k)
    seg.record["index"]["params"].update(tuning.params)
    seg.record["index"]["tuned"] = tuning.to_dict()
    return tuning


@dataclass
class Sample:
    """Held-back vectors searched as queries, and each one's exact top k."""

    q: np.ndarray
    truth: np.ndarray


def _search(store, seg, q: np.ndarray, k: int, params: dict, allowed: np.ndarray) -> np.ndarray:
    """Rows of the segment's top k for `q` under `params` straight from FAISS (PQ-ranked, not
    re-scored), among the `allowed` rows only."""
    choice = vi.IndexChoice(seg.choice.kind, {**seg.choice.params, **params})
    selector, _bits = vi.bitmap_selector(allowed)
    return seg.faiss.search(q, k, params=vi.search_params(choice, selector, k))[1]


def _ms(store, seg, q: np.ndarray, params: dict, k: int) -> float:
    """Median time of one query at a time through the store's own search, `params` in force."""
    saved = dict(seg.record["index"]["params"])
    seg.record["index"]["params"].update(params)
    times = []
    try:
        for i in range(min(TIMED_QUERIES, len(q))):
            t = time.perf_counter()
            search_segment(seg, store.docs, q[i:i + 1], k)
            times.append(time.perf_counter() - t)
    finally:
        seg.record["index"]["params"] = saved
    return 1000 * float(np.median(times))


def _tune_hnsw(store, seg, allowed, pick: Sample, check: Sample, target, k) -> Tuning:
    tried, passed = [], None
    for ef in EF_SEARCH:
        r = recall(_search(store, seg, pick.q, k, {"efSearch": ef}, allowed), pick.truth)
        tried.append({"efSearch": ef, "recall": round(r[0], 4)})
        if passed is None and reaches(r, target):
            passed = ef
        if passed is not None:  # confirmed from here on, deeper if need be
            c = recall(_search(store, seg, check.q, k, {"efSearch": ef}, allowed), check.truth)
            tried[-1]["confirmed"] = round(c[0], 4)
            if reaches(c, target):
                return _tuning(store, seg, pick, check, target, k, {"efSearch": ef}, c, True, tried)
    best = max(tried, key=lambda t: t.get("confirmed", t["recall"]))
    params = {"efSearch": best["efSearch"]}
    c = recall(_search(store, seg, check.q, k, params, allowed), check.truth)
    return _tuning(store, seg, pick, check, target, k, params, c, False, tried)


def _exact(store, seg, allowed, pick: Sample, check: Sample, target, k) -> Tuning:
    """A scan: every answer exact, nothing to tune."""
    return Tuning(target, k, len(pick.q) + len(check.q), 1.0, True, 0.0, {}, _ms(store, seg, pick.q, {}, k))


def _tuning(store, seg, pick: Sample, check: Sample, target, k, params, confirmed, reached, tried,
            ms: float | None = None) -> Tuning:
    """The Tuning recorded: recall as the confirmation sample measured it."""
    return Tuning(target, k, len(pick.q) + len(check.q), round(confirmed[0], 4), reached, round(confirmed[1], 4),
                  params, ms if ms is not None else _ms(store, seg, pick.q, params, k), tried)


def _tune_ivfpq(store, seg, allowed, pick: Sample, check: Sample, target, k) -> Tuning:
    nlist = int(seg.choice.params["nlist"])
    deepest = REFINES[-1]
    tried, reaching, best = [], [], None
    depths = list(REFINES)
    for nprobe in [p for p in NPROBES if p <= nlist]:
        cand = _search(store, seg, pick.q, k * deepest, {"nprobe": nprobe}, allowed)
        for refine in depths:
            r = recall(_rescored(store, seg, pick.q, cand[:, :k * refine], k), pick.truth)
            if best is None or r[0] > best[1][0]:
                best = ({"nprobe": nprobe, "refine": refine}, r)
            if reaches(r, target) or refine == depths[-1]:
                tried.append({"nprobe": nprobe, "refine": refine, "recall": round(r[0], 4)})
            if reaches(r, target):
                reaching.append({"nprobe": nprobe, "refine": refine})
                break
        # Probing more cells is cheaper only where it needs a shallower re-scoring.
        depths = [d for d in depths if d < reaching[-1]["refine"]] if reaching else depths
        if not depths or best[1][0] >= 0.9999:
            break
    timed = sorted(((_ms(store, seg, pick.q, c, k), c) for c in reaching), key=lambda t: t[0])
    for t in tried:
        for ms_c, p in timed:
            if (t["nprobe"], t["refine"]) == (p["nprobe"], p["refine"]):
                t["ms_per_query"] = round(ms_c, 3)
    # Confirmation, cheapest first; a setting that falls short re-scores deeper before the next is tried.
    fallback = None
    for ms, params in timed:
        cand = _search(store, seg, check.q, k * deepest, {"nprobe": params["nprobe"]}, allowed)
        for refine in [d for d in REFINES if d >= params["refine"]]:
            c = recall(_rescored(store, seg, check.q, cand[:, :k * refine], k), check.truth)
            p = {"nprobe": params["nprobe"], "refine": refine}
            tried.append({**p, "confirmed": round(c[0], 4)})
            if fallback is None or c[0] > fallback[1][0]:
                fallback = (p, c)
            if reaches(c, target):
                return _tuning(store, seg, pick, check, target, k, p, c, True, tried,
                               ms if refine == params["refine"] else None)
    params = fallback[0] if fallback else best[0]
    cand = _search(store, seg, check.q, k * deepest, {"nprobe": params["nprobe"]}, allowed)
    c = recall(_rescored(store, seg, check.q, cand[:, :k * params["refine"]], k), check.truth)
    return _tuning(store, seg, pick, check, target, k, params, c, False, tried)


# How each index kind is tuned, by name (index/index_kinds.py): a new kind adds its tuner here.
TUNERS = {"flat": _exact, "hnsw": _tune_hnsw, "ivfpq": _tune_ivfpq}


def _rescored(store, seg, q: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """The top k of each query's candidates by their exact vectors (what refine does)."""
    wanted = np.unique(cand[cand >= 0])
    vecs = store.docs.vectors_at(seg.id, wanted)
    out = np.full((len(q), k), -1, dtype=np.int64)
    for qi in range(len(q)):
        c = cand[qi][cand[qi] >= 0]
        exact = vecs[np.searchsorted(wanted, c)] @ q[qi]
        top = np.argsort(-exact, kind="stable")[:k]
        out[qi, :len(top)] = c[top]
    return out


def tune_store(store, target: float, k: int = 10) -> dict[int, Tuning]:
    """Pick each segment's search parameters for recall@k of `target` on its own vectors and
    save them, so every process that opens the index uses them (`umr index tune`)."""
    store.require_write("tune search parameters")
    with store.lock:
        found = {seg.id: tune_segment(store, seg, target, k)
                 for seg in store.segments if seg.faiss is not None and seg.alive.sum() > k + 1}
        store.manifest["index_request"]["target_recall"] = target
        store.record_event("tuned", target_recall=target, k=k,
                           segments={i: {"params": t.params, "recall": t.recall} for i, t in found.items()})
    store.save()
    return found
