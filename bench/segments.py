"""Searching an index of several segments: side by side (umr's segment threads) against one
after another, in one run.

An index holds one segment per encoder version (and, with `--vectors` builds and updates, more
over time); IndexStore.search used to visit them in turn. Here: SEGMENTS segments of N
synthetic clustered unit vectors each (dim 256, raw cosines merged), flat (exact) or HNSW, and
the same queries searched with SEGMENT_THREADS=1 and with the default, alternating, REPEATS
times; single queries (a user's latency) and batches of 32 (a server's micro-batch).
Run: python bench/segments.py [--n 100000] [--segments 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import clustered, figure, machine, median, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402

DIM = 256
K = 10


def build(path: Path, kind: str, n: int, segments: int, rng, centers):
    from umr.index import IndexStore
    from umr.index.documents import DocRecord

    enc = {"spec": "synthetic", "fingerprint": "0" * 16, "dim": DIM}
    store = IndexStore.create(path, enc, kind)
    store.add([DocRecord(f"s0-{i}", "image") for i in range(n)], clustered(rng, n, centers))
    store.finalize()
    for s in range(1, segments):
        store.activate(store.register_version({**enc, "fingerprint": f"{s}" * 16}))
        for first in range(0, n, 50_000):
            m = min(50_000, n - first)
            store.add([DocRecord(f"s{s}-{first + i}", "image") for i in range(m)], clustered(rng, m, centers))
    return store


def timed_search(store, queries, batch, repeats):
    """Median seconds per query over `repeats` passes through `queries` in batches of `batch`."""
    from umr.index.search_plan import SearchPlan

    per_pass = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(queries), batch):
            store.search(SearchPlan(queries[i : i + batch], K))
        per_pass.append((time.perf_counter() - t0) / len(queries))
    return median(per_pass)


def main() -> None:
    from umr.index import search_merge
    from umr.index.search_plan import SearchPlan

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1024, DIM)).astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-segments-"))
    q = clustered(rng, a.queries, centers)
    threads = search_merge.SEGMENT_THREADS
    rows, plot = [], {}
    for kind in ("flat", "hnsw"):
        t0 = time.perf_counter()
        store = build(tmp / kind, kind, a.n, a.segments, rng, centers)
        build_s = time.perf_counter() - t0
        for batch in (1, 32):
            search_merge.SEGMENT_THREADS = 1
            same = store.search(SearchPlan(q[:8], K))
            search_merge.SEGMENT_THREADS = threads
            assert [[h.id for h in x] for x in store.search(SearchPlan(q[:8], K))] == [[h.id for h in x] for x in same]
            one, side = [], []
            for _ in range(2):  # alternate the two ways, each timed over `repeats` passes
                search_merge.SEGMENT_THREADS = 1
                one.append(timed_search(store, q, batch, a.repeats))
                search_merge.SEGMENT_THREADS = threads
                side.append(timed_search(store, q, batch, a.repeats))
            one_ms, side_ms = median(one) * 1e3, median(side) * 1e3
            rows.append(f"| {kind} | {batch} | {one_ms:.2f} | {side_ms:.2f} | {one_ms / side_ms:.2f}x |")
            plot.setdefault(f"{kind}, batch {batch}", {})["one after another"] = one_ms
            plot[f"{kind}, batch {batch}"]["side by side"] = side_ms
            print(rows[-1], f"(built in {build_s:.0f}s)", file=sys.stderr)
        store.close()
    body = f"""## Searching many segments (`bench/segments.py`)

{a.segments} segments of {a.n:,} clustered unit vectors each (dim {DIM}; one per encoder version, raw cosines merged),
{a.queries} queries, k={K}; the same store searched one segment after another (`SEGMENT_THREADS=1`) and side by side
({threads} segment threads, the default here), alternating, medians of {a.repeats} passes x 2; both return the same
hits (checked). {machine()}.

| segments' index | queries per search | ms per query, one after another | side by side | speed-up |
|---|---|---|---|---|
{chr(10).join(rows)}

Exact segments are scored with torch's GEMM, which already uses every core, and an HNSW walk is
shorter than a thread hand-off (so HNSW segments stay in the calling thread): on {threads} cores the
gain is small. Not measured here: where it should pay is on machines with more cores than one
segment's search uses, and for IVF segments (FAISS scans for one query on one thread).

{figure("segments", bars, plot, ylabel="ms per query (median)", title=f"{a.segments} segments of {a.n:,} vectors")}
"""
    write_section("segments", body)


if __name__ == "__main__":
    main()
