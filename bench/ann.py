"""Exact search against numpy brute force and FAISS's flat index, and HNSW / IVF-PQ against exact, at 1M x 384.

Vectors are synthetic but clustered (a mixture of 4,096 directions with noise), which is how
real embeddings behave and where ANN indexes are meant to work; queries are fresh draws from
the same mixture. Index parameters are the ones `--index auto` would record.
Run: python bench/ann.py [--n 1000000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import clustered, figure, machine, numpy_topk, timed, write_section  # noqa: E402
from umr.plots import lines  # noqa: E402

DIM = 384
K = 10


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def sweep(index, choice, knob, values, make_params, build_s, q, truth, a):
    """One table row per value of a search-time knob, marking the one `auto` records."""
    from umr.index import vector_index as vi

    rows = []
    memory = f"{vi.estimated_bytes(choice.kind, a.n, DIM, choice.params) / 2**20:.0f} MB"
    for v in values:
        params = make_params(v)
        t, (_, ids) = timed(lambda: index.search(q, K, params=params), a.repeats)
        label = f"{choice.factory_string()} {knob}={v}" + (" (auto default)" if v == choice.params[knob] else "")
        rows.append((label, f"{build_s:.0f}", recall(ids, truth), len(q) / t, memory))
    return rows


def main():
    import faiss

    from umr.index import vector_index as vi

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4096, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = clustered(rng, a.n, centers)
    q = clustered(rng, a.queries, centers)
    log = lambda *m: print(*m, file=sys.stderr, flush=True)  # noqa: E731
    rows = []

    flat = vi.new_index(vi.IndexChoice("flat"), DIM)
    flat.add(x)
    xb = vi.flat_vectors(flat)
    t_umr, (_, truth) = timed(lambda: vi.exact_topk(q, xb, K), a.repeats)
    sub = q[:200]
    t_np, np_ids = timed(lambda: numpy_topk(sub, x, K), a.repeats)
    t_faiss, (_, faiss_ids) = timed(lambda: flat.search(sub, K), a.repeats)
    same_umr = float(np.mean([set(f) == set(t) for f, t in zip(truth[:200], np_ids)]))
    same_faiss = float(np.mean([set(f) == set(t) for f, t in zip(faiss_ids, np_ids)]))
    flat_mem = f"{x.nbytes / 2**20:.0f} MB"
    rows.append(("numpy brute force (q @ X.T, argpartition), 200 queries", "-", 1.0, len(sub) / t_np, flat_mem))
    rows.append(("FAISS IndexFlatIP.search, 200 queries", "-", same_faiss, len(sub) / t_faiss, flat_mem))
    rows.append(("umr exact (torch GEMM + top-k in chunks over the FAISS flat storage)", "-", same_umr, len(q) / t_umr, flat_mem))
    log(f"exact: umr {len(q) / t_umr:.0f} qps, numpy {len(sub) / t_np:.0f} qps, faiss {len(sub) / t_faiss:.0f} qps")

    hnsw_choice = vi.choose_index("hnsw", a.n, DIM)
    hnsw = vi.new_index(hnsw_choice, DIM)
    t0 = time.perf_counter()
    hnsw.add(x)
    build_hnsw = time.perf_counter() - t0
    log(f"hnsw built in {build_hnsw:.0f}s")
    hnsw_rows = sweep(hnsw, hnsw_choice, "efSearch", (32, 64, 128, 256), lambda v: faiss.SearchParametersHNSW(efSearch=v),
                      build_hnsw, q, truth, a)
    rows += hnsw_rows
    del hnsw

    pq_choice = vi.choose_index("auto", a.n, DIM, memory_budget=128 << 20)
    if pq_choice.kind != "ivfpq":  # small --n runs: HNSW fits, so ask for IVF-PQ under the same budget
        pq_choice = vi.choose_index("ivfpq", a.n, DIM, memory_budget=128 << 20)
    ivf = vi.new_index(pq_choice, DIM)
    t0 = time.perf_counter()
    train = x[rng.choice(a.n, min(a.n, max(50_000, 64 * pq_choice.params["nlist"])), replace=False)]
    ivf.train(train)
    ivf.add(x)
    build_ivf = time.perf_counter() - t0
    log(f"ivfpq {pq_choice.factory_string()} built in {build_ivf:.0f}s")
    ivf_rows = sweep(ivf, pq_choice, "nprobe", (8, 32, 64, 128), lambda v: faiss.SearchParametersIVF(nprobe=v),
                     build_ivf, q, truth, a)
    rows += ivf_rows
    refined_rows = []
    # What umr serves for IVF-PQ: the top k*refine by PQ codes, re-scored with exact vectors read
    # from disk (umr keeps them in its document store; here a memory-mapped .npy stands in).
    stored = Path(tempfile.mkdtemp(prefix="umr-ann-")) / "vectors.npy"
    np.save(stored, x)
    disk = np.load(stored, mmap_mode="r")
    refine = pq_choice.params["refine"]
    for nprobe in (max(1, pq_choice.params["nprobe"] // 4), pq_choice.params["nprobe"]):
        params = faiss.SearchParametersIVF(nprobe=nprobe)

        def refined():
            _, cand = ivf.search(q, K * refine, params=params)
            out = np.empty((len(q), K), dtype=np.int64)
            for i, c in enumerate(cand):
                c = c[c >= 0]
                exact = np.asarray(disk[np.sort(c)]) @ q[i]
                out[i] = np.sort(c)[np.argsort(-exact)[:K]]
            return out

        t, ids = timed(refined, a.repeats)
        refined_rows.append((f"{pq_choice.factory_string()} nprobe={nprobe} + exact re-rank of top {K * refine} (umr default)"
                     if nprobe == pq_choice.params["nprobe"] else
                     f"{pq_choice.factory_string()} nprobe={nprobe} + exact re-rank of top {K * refine}",
                     f"{build_ivf:.0f}", recall(ids, truth), len(q) / t,
                     f"{vi.estimated_bytes('ivfpq', a.n, DIM, pq_choice.params) / 2**20:.0f} MB + vectors on disk"))
    rows += refined_rows
    curve = lambda rs: ([r[2] for r in rs], [r[3] for r in rs])  # noqa: E731  (recall, QPS) per measured setting
    plot = figure("ann", lines, {**{name: curve([row]) for name, row in zip(("numpy exact", "FAISS IndexFlatIP", "umr exact"), rows)},
                                 f"{hnsw_choice.factory_string()}, efSearch 32-256": curve(hnsw_rows),
                                 f"{pq_choice.factory_string()}, nprobe 8-128": curve(ivf_rows),
                                 f"{pq_choice.factory_string()} + exact re-rank (umr)": curve(refined_rows)},
                  xlabel="recall@10 against exact search", ylabel="queries/s (log)", logy=True, markers=True,
                  title=f"Recall against throughput at {a.n:,} x {DIM}")
    table = "\n".join(f"| {n} | {b} | {r:.3f} | {qps:,.0f} | {mem} |" for n, b, r, qps, mem in rows)
    body = f"""## Exact and approximate search at {a.n:,} x {DIM} (`bench/ann.py`)

Clustered synthetic unit vectors (4,096 centres + noise), {a.queries} fresh queries searched as one batch, k={K},
median of {a.repeats} runs; numpy vs FAISS exact on the first 200 queries. Recall@10 is against exact search.
IVF-PQ is what `--index auto --memory-budget 128M` picks ({pq_choice.reason}). {machine()}.

| index | build s | recall@10 | QPS | memory (est.) |
|---|---|---|---|---|
{table}

umr's exact search returns the same top-10 as numpy brute force on {same_umr:.1%} of queries (FAISS's IndexFlatIP: {same_faiss:.1%})
at {(len(q) / t_umr) / (len(sub) / t_np):.2f}x numpy's throughput and {(len(q) / t_umr) / (len(sub) / t_faiss):.1f}x IndexFlatIP's: on these 2-core
machines FAISS's bundled OpenBLAS is the slower GEMM, so umr scores flat segments with torch's GEMM and top-k over
FAISS's own storage.
IVF-PQ alone is limited by code precision on this tightly clustered data (recall flat in nprobe); re-ranking its
top {K * refine} with the exact vectors is what `umr` does for IVF-PQ segments.

{plot}
"""
    write_section("ann", body)


if __name__ == "__main__":
    main()
