"""An index larger than memory: 10M x 256 synthetic clustered vectors, built and served in 2 GB.

Stages, each timed:
  generate   N unit vectors around C random centres (cluster sizes uneven, noise per point),
             written as emb.npy + ids.jsonl (the form clip-retrieval users export)
  build      `umr index build --vectors --ids --encoder lit-init:DIM --memory-budget BUDGET
             --vector-dtype DTYPE`, as a user runs it (auto picks IVF-PQ when HNSW would not fit
             the budget); its peak resident memory is the build's
  serve      a fresh process opens the index read-only (IVF lists memory-mapped from the file,
             exact vectors for the re-scoring read from the segment's vector file), answers
             Q held-out queries one at a time and in batches of 32, and reports its resident
             memory (anonymous and file-backed, and the peak) after them; --serve-repeats
             such processes in turn (3), their medians reported: one process's rate differed
             from the next's by up to 1.6x on this machine
  http       `umr serve --read-only` over the same index: text queries through the encoder
             (bench/loadgen.py, 4 connections), and the server's resident memory after them
  recall     recall@10 of the served results against exact search (a scan of emb.npy) for a
             sample of the queries
Run: python bench/large.py [--n 10000000] [--dim 256] [--budget 2G] [--vector-dtype float16] [--work DIR] [--keep]
Needs about 2.3 x N x DIM x 4 bytes of disk (22 GB at 10M x 256) under --work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (figure, machine, median, proc_memory, run_loadgen, run_sampling_memory,  # noqa: E402
                          wait_until_up, write_section)
from umr.index.vector_index import parse_bytes  # noqa: E402
from umr.plots import bars  # noqa: E402

CHUNK = 250_000
ENCODER = "lit-init:{dim}:0"


def vector_flags(ap: argparse.ArgumentParser, n: int, work: str) -> None:
    """The flags of the generated vectors and the build's budget (bench/imports.py has them too)."""
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--budget", default="2G")
    ap.add_argument("--work", default=work)


def ensure_vectors(work: Path, n: int, dim: int, clusters: int) -> bool:
    """emb.npy and ids.jsonl of n x dim under `work`, generated unless they are there already;
    returns whether they were generated."""
    if (work / "ids.jsonl").exists() and np.load(work / "emb.npy", mmap_mode="r").shape == (n, dim):
        return False
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate(work, n, dim, clusters)
    return True


def generate(work: Path, n: int, dim: int, clusters: int, seed: int = 0) -> None:
    """Clustered unit vectors, chunk by chunk into a memory-mapped .npy (memory stays flat)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.pareto(1.5, clusters) + 1  # uneven cluster sizes, as real corpora have
    weights /= weights.sum()
    out = np.lib.format.open_memmap(work / "emb.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        out[start:start + CHUNK] = points(rng, centres, weights, min(CHUNK, n - start))
    out.flush()
    del out
    np.save(work / "queries.npy", points(np.random.default_rng(seed + 1), centres, weights, 2000))
    with open(work / "ids.jsonl", "w") as f:
        for start in range(0, n, CHUNK):
            f.write("".join(f'"v{i}"\n' for i in range(start, min(n, start + CHUNK))))


def points(rng, centres, weights, count):
    which = rng.choice(len(centres), count, p=weights)
    noise = rng.standard_normal((count, centres.shape[1])).astype(np.float32)
    spread = rng.uniform(0.3, 0.9, (count, 1)).astype(np.float32)  # tight and loose members alike
    x = centres[which] + spread * noise / np.sqrt(centres.shape[1])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_truth(work: Path, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row numbers of `q` by a scan of emb.npy (rows are ids v<row>)."""
    from umr.index.vector_index import exact_topk

    x = np.load(work / "emb.npy", mmap_mode="r")
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(x), 1_000_000):
        s, i = exact_topk(q, np.asarray(x[start:start + 1_000_000]), k)
        s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, order, 1), np.take_along_axis(i_all, order, 1)
    return best_i


def serve_child(index: Path, work: Path, seconds: float) -> None:
    """The serving process: opens read-only, searches, prints one JSON line."""
    from umr.index.store import IndexStore
    from umr.index.search_plan import SearchPlan

    t0 = time.perf_counter()
    store = IndexStore.open(index, "read")
    opened = time.perf_counter() - t0
    after_open = proc_memory()
    q = np.load(work / "queries.npy")
    rows_of = {}

    def rows(hits):
        return [int(h.id[1:]) for h in hits]

    store.search(SearchPlan(q[:8], 10))  # first touch of the quantizer and tables
    times, t_end = [], time.monotonic() + seconds
    for i in range(len(q)):
        if time.monotonic() > t_end:
            break
        t = time.perf_counter()
        rows_of[i] = rows(store.search(SearchPlan(q[i:i + 1], 10))[0])
        times.append(time.perf_counter() - t)
    batch_times, t_end = [], time.monotonic() + seconds
    for start in range(0, len(q), 32):
        if time.monotonic() > t_end:
            break
        t = time.perf_counter()
        store.search(SearchPlan(q[start:start + 32], 10))
        batch_times.append((time.perf_counter() - t, len(q[start:start + 32])))
    print(json.dumps({
        "open_s": opened, "after_open": after_open, "after_queries": proc_memory(),
        "queries": len(times), "p50_ms": 1000 * median(times), "p99_ms": 1000 * sorted(times)[int(0.99 * (len(times) - 1))],
        "qps_single": len(times) / sum(times),
        "qps_batch32": sum(n for _, n in batch_times) / sum(t for t, _ in batch_times),
        "rows": {str(i): r for i, r in rows_of.items()},
        "segment": store.info()["segments"][0],
    }))


def tuning_text(tuned: dict | None) -> str:
    if not tuned:
        return "none (defaults)"
    verdict = "reached" if tuned["reached"] else "NOT reached"
    return (f"target recall@{tuned['k']} {tuned['target']} {verdict}: {tuned['params']}, recall {tuned['recall']:.3f} "
            f"on {tuned['queries']} held-back vectors, {tuned['ms_per_query']:.1f} ms a query while tuning")


def http_phase(index: Path, work: Path, port: int, requests: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    umr = Path(sys.executable).parent / "umr"
    proc = subprocess.Popen([str(umr), "serve", str(index), "--read-only", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, seconds=600)
        bodies = work / "bodies.jsonl"
        words = ["dog", "beach", "red car", "mountain", "a child playing", "city at night", "two cats", "snow"]
        bodies.write_text("".join(json.dumps({"text": f"{w} {i}", "k": 10}) + "\n" for i, w in enumerate(words * 8)))
        load = run_loadgen(port, bodies, concurrency=4, requests=requests, max_seconds=120)
        return {"load": load, "memory": proc_memory(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    vector_flags(ap, 10_000_000, "/tmp/umr-bench-large")
    ap.add_argument("--vector-dtype", default="float16", choices=["float32", "float16"])
    ap.add_argument("--target-recall", type=float, default=0.95,
                    help="passed to the build (0 for the untuned defaults)")
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60, help="time bound of each query loop")
    ap.add_argument("--serve-repeats", type=int, default=3,
                    help="fresh read-only processes the serve stage runs in turn (figures: their medians)")
    ap.add_argument("--http-requests", type=int, default=400)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--keep", action="store_true", help="keep the vectors and the index")
    ap.add_argument("--reuse-index", action="store_true",
                    help="serve the index a --keep run left (re-tuned to --target-recall) instead of building it")
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    index = work / "index"
    if args.serve_child:
        return serve_child(index, work, args.seconds)

    stages = {}
    t = time.perf_counter()
    if ensure_vectors(work, args.n, args.dim, args.clusters):
        stages["generate"] = time.perf_counter() - t
    umr = Path(sys.executable).parent / "umr"
    if args.reuse_index:
        return serve_phases(args, work, index, umr, stages, reused=retune(args, index, umr))
    shutil.rmtree(index, ignore_errors=True)
    t = time.perf_counter()
    build, build_peaks = run_sampling_memory([
        str(umr), "index", "build", "--vectors", str(work / "emb.npy"), "--ids", str(work / "ids.jsonl"),
        "--encoder", ENCODER.format(dim=args.dim), "--out", str(index), "--memory-budget", args.budget,
        "--vector-dtype", args.vector_dtype, "--json", "--no-progress",
        *(["--target-recall", str(args.target_recall)] if args.target_recall else [])])
    ingest_s = json.loads(build.stdout)["seconds"] if build.returncode == 0 else float("nan")
    stages["build"] = time.perf_counter() - t
    if build.returncode:
        sys.exit(f"build failed: {build.stderr[-3000:]}")
    serve_phases(args, work, index, umr, stages, built=(ingest_s, build_peaks))


def retune(args, index: Path, umr: Path) -> str:
    if not (index / "manifest.json").exists():
        sys.exit(f"--reuse-index: no index at {index}; run with --keep first")
    t = time.perf_counter()
    r = subprocess.run([str(umr), "index", "tune", str(index), "--target-recall", str(args.target_recall)],
                       capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"tuning failed: {r.stderr[-3000:]}")
    return f"reused (built by an earlier --keep run); re-tuned in {time.perf_counter() - t:.0f} s"


def serve_once(work: Path, seconds: float) -> dict:
    """One fresh read-only process's open, searches and memory (serve_child)."""
    served = subprocess.run([sys.executable, __file__, "--serve-child", "--work", str(work), "--seconds", str(seconds)],
                            capture_output=True, text=True)
    if served.returncode:
        sys.exit(f"serving failed: {served.stderr[-3000:]}")
    return json.loads(served.stdout.strip().splitlines()[-1])


def spread(runs: list[dict], key: str, fmt: str) -> str:
    """The runs' median of `key`, and each run's value where there are several."""
    values = [r[key] for r in runs]
    each = f" (runs: {', '.join(format(v, fmt) for v in values)})" if len(values) > 1 else ""
    return f"{format(median(values), fmt)}{each}"


def serve_phases(args, work: Path, index: Path, umr: Path, stages: dict, built=None, reused: str = "") -> None:
    t = time.perf_counter()
    runs = [serve_once(work, args.seconds) for _ in range(max(1, args.serve_repeats))]
    stages["serve"] = time.perf_counter() - t
    s = runs[0]  # its results give the recall; the rates below are the runs' medians
    t = time.perf_counter()
    http = http_phase(index, work, args.port, args.http_requests)
    stages["http"] = time.perf_counter() - t

    t = time.perf_counter()
    q = np.load(work / "queries.npy")
    sample = [int(i) for i in sorted(s["rows"], key=int)[: args.recall_sample]]
    truth = exact_truth(work, q[sample], 10)
    recalls = [len(set(s["rows"][str(i)]) & set(truth[j].tolist())) / 10 for j, i in enumerate(sample)]
    stages["recall"] = time.perf_counter() - t
    index_bytes = sum(f.stat().st_size for f in index.rglob("*") if f.is_file())
    faiss_bytes = sum(f.stat().st_size for f in index.rglob("*.faiss"))
    vector_bytes = sum(f.stat().st_size for f in index.rglob("vectors.*"))
    docs_bytes = sum(f.stat().st_size for f in index.glob("docs.sqlite*"))
    seg = s["segment"]
    mem, hmem = s["after_queries"], http["memory"]
    load = http["load"]
    rows = [
        ("vectors", f"{args.n:,} x {args.dim} ({args.n * args.dim * 4 / 2**30:.1f} GiB as float32), {args.clusters:,} clusters"),
        ("memory budget", args.budget),
        ("index chosen", f"{seg['index']['factory']}, nprobe {seg['index']['params'].get('nprobe')}, "
                         f"refine x{seg['index']['params'].get('refine')}: {seg['index']['reason']}"),
        ("tuning (--target-recall)", tuning_text(seg["index"].get("tuned"))),
        ("on disk", f"{index_bytes / 2**30:.2f} GiB in all ({index_bytes / 1e9:.2f} GB): vector file "
                    f"{vector_bytes / 2**30:.2f} GiB ({args.vector_dtype}), docs.sqlite {docs_bytes / 2**30:.2f} GiB, "
                    f"FAISS file {faiss_bytes / 2**20:.0f} MiB"),
        ("generate", f"{stages.get('generate', float('nan')):.0f} s" if "generate" in stages else "reused"),
        *([("build (CLI, end to end)", f"{stages['build']:.0f} s ({args.n / stages['build']:,.0f} vectors/s), "
                                       f"peak RSS {built[1]['VmHWM']:,.0f} MiB: anonymous at most "
                                       f"{built[1]['RssAnon']:,.0f}, file-backed (mapped libraries and files) at most "
                                       f"{built[1]['RssFile']:,.0f} (sampled every 0.25 s)"),
           ("of which ingest (read, check, store)", f"{built[0]:.0f} s ({args.n / built[0]:,.0f} vectors/s)")]
          if built else [("build", reused)]),
        ("open read-only", f"{spread(runs, 'open_s', '.1f')} s; RSS after open {s['after_open']['VmRSS']:,.0f} MiB"),
        (f"search, one query at a time (medians of {len(runs)} fresh processes)",
         f"{spread(runs, 'qps_single', '.0f')} QPS, p50 {spread(runs, 'p50_ms', '.1f')} ms, "
         f"p99 {spread(runs, 'p99_ms', '.1f')} ms ({s['queries']} queries each)"),
        ("search, batches of 32", f"{spread(runs, 'qps_batch32', '.0f')} QPS"),
        ("RSS serving (in process)", f"{mem['VmRSS']:,.0f} MiB = {mem['RssAnon']:,.0f} anonymous + {mem['RssFile']:,.0f} "
                                     f"file-backed; peak {mem['VmHWM']:,.0f} MiB"),
        ("RSS serving (`umr serve --read-only`, after HTTP load)",
         f"{hmem['VmRSS']:,.0f} MiB = {hmem['RssAnon']:,.0f} anonymous + {hmem['RssFile']:,.0f} file-backed; "
         f"peak {hmem['VmHWM']:,.0f} MiB"),
        ("HTTP text queries (4 connections)", f"{len(load['latencies_ms']) / load['wall_s']:.0f} QPS, "
                                              f"p50 {median(load['latencies_ms']):.1f} ms, {load['errors']} errors "
                                              f"of {len(load['latencies_ms'])}"),
        ("recall@10 against exact search", f"{np.mean(recalls):.3f} mean, {np.median(recalls):.2f} median "
                                           f"({len(recalls)} queries)"),
    ]
    body = "\n".join([
        "## Larger than memory (bench/large.py)", "",
        f"Machine: {machine()}. {__doc__.split('Run:')[0].split(chr(10), 1)[1].strip()}", "",
        "| | |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
        figure("large", bars, {"resident memory while serving (MiB)": {
            "budget": parse_bytes(args.budget) / 2**20, "in process": mem["VmRSS"], "umr serve": hmem["VmRSS"]}},
            ylabel="MiB", title=f"{args.n:,} x {args.dim}: resident memory against the budget", highlight="budget"), "",
        f"Run: `python bench/large.py --n {args.n} --dim {args.dim} --budget {args.budget} "
        f"--vector-dtype {args.vector_dtype} --target-recall {args.target_recall}"
        f"{f' --seconds {args.seconds:g}' if args.seconds != 60 else ''}`.",
    ])
    write_section("large", body)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
