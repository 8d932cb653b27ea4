"""Search latency and throughput: the in-process engine against HTTP, batching on and off.

A 100k-vector index (synthetic unit vectors of the encoder's width, exact search) behind the
real lit-base encoder; queries are real Flickr8k captions. For concurrency 1, 8 and 32:
  in-process   Engine.search() from C threads in this process
  HTTP         `umr serve` in its own process, driven by bench/loadgen.py in another,
               with micro-batching on and with --no-batching
  baseline     with --baseline REV: `umr serve` of that git revision on a copy of the index,
               measured in the same rounds (the ratio holds across machines; the QPS do not)
Also: the HTTP overhead at concurrency 1 as the median of paired blocks (in-process and HTTP
alternating, so the machine's drift cancels); the same overhead split per request into the time
outside the route (latency minus the server's took_ms), for `umr serve` and for the least a
FastAPI service can do around the same engine (bench/minimal_server.py); and the ceiling:
encode + search of full batches of 32 back to back in this process, what no server on this
machine can beat.
Reported: p50 / p99 latency and QPS, medians over REPEATS rounds.
Run: python bench/search.py [--repeats 3] [--baseline REV]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from umr.cli import SERVE_ENV  # noqa: E402

os.environ.update(SERVE_ENV)  # the in-process engine runs with the same thread settings as `umr serve`
from bench.common import (DATA, ROOT, baseline_checkout, figure, machine, median, percentile,  # noqa: E402
                          remove_checkout, run_loadgen, wait_until_up, write_section)
from umr.plots import bars  # noqa: E402

N_VECTORS = 100_000
K = 10


def build_index(path: Path, enc) -> None:
    import numpy as np

    from umr.index import IndexStore
    from umr.index.documents import DocRecord

    rng = np.random.default_rng(0)
    store = IndexStore.create(path, enc.record(), "flat")
    for start in range(0, N_VECTORS, 20_000):
        x = rng.standard_normal((20_000, enc.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.add([DocRecord(f"doc{start + i}", "text", text=f"synthetic document {start + i}") for i in range(len(x))], x)
    store.finalize()
    store.close()


def in_process(engine, queries, concurrency, requests):
    from umr.retrieval.engine import Query

    lat = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            engine.search([Query(queries[i % len(queries)])], K)
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    return {"latencies_ms": lat, "wall_s": time.perf_counter() - t0, "errors": 0}


def start(cmd: list[str], port: int, code: Path = ROOT) -> subprocess.Popen:
    """A server process, returned once it answers /healthz."""
    # `python -m` puts the working directory first on sys.path: a baseline runs its own code.
    proc = subprocess.Popen(cmd, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(code)})
    wait_until_up(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def serve(idx: Path, port: int, batching: bool, read_only: bool = False, code: Path = ROOT) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "umr.cli", "serve", str(idx), "--port", str(port)] + ([] if batching else ["--no-batching"])
    cmd += ["--read-only"] if read_only else []  # the second server beside the first, which holds the write lock
    return start(cmd, port, code)


def http(port, bodies_file, concurrency, requests):
    res = run_loadgen(port, bodies_file, concurrency, requests)
    if res["errors"]:
        raise RuntimeError(f"{res['errors']} failed requests: {res['first_error']}")
    return res


def ceiling(engine, queries, rounds: int = 10, batch: int = 32) -> float:
    """Queries per second of encode + search on full batches, back to back, in this process."""
    from umr.retrieval.engine import Query

    t0 = time.perf_counter()
    for r in range(rounds):
        engine.search([Query(queries[(r * batch + i) % len(queries)]) for i in range(batch)], K)
    return rounds * batch / (time.perf_counter() - t0)


def paired_gap(engine, queries, port, bodies_file, blocks: int, per_block: int = 30) -> list[float]:
    """HTTP p50 minus in-process p50 at concurrency 1, per pair of adjacent blocks."""
    gaps = []
    for _ in range(blocks):
        mine = in_process(engine, queries, 1, per_block)
        theirs = http(port, bodies_file, 1, per_block)
        gaps.append(percentile(theirs["latencies_ms"], 50) - percentile(mine["latencies_ms"], 50))
    return gaps


def outside_route(port: int, bodies_file, requests: int = 60) -> list[float]:
    """Per request at concurrency 1: latency minus the server's own took_ms, so the time in
    uvicorn, FastAPI, the middlewares and the load generator, without the forward's noise."""
    res = run_loadgen(port, bodies_file, 1, requests, took=True)
    return [lat - took for lat, took in zip(res["latencies_ms"], res["took_ms"])]


def serve_minimal(idx: Path, port: int) -> subprocess.Popen:
    return start([sys.executable, str(ROOT / "bench" / "minimal_server.py"), str(idx), str(port)], port)


def refused_round_trip(port: int, tmp: Path, requests: int = 200) -> float:
    """p50 of a search refused after validation (k=0 -> 422): the HTTP stack with no model work."""
    bad = tmp / "refused.jsonl"
    bad.write_text(json.dumps({"text": "a dog", "k": 0}) + "\n")
    return percentile(run_loadgen(port, bad, 1, requests, max_seconds=60)["latencies_ms"], 50)


def summary(runs):
    p50 = median([percentile(r["latencies_ms"], 50) for r in runs])
    p99 = median([percentile(r["latencies_ms"], 99) for r in runs])
    qps = median([len(r["latencies_ms"]) / r["wall_s"] for r in runs])
    return p50, p99, qps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--baseline", help="a git revision to serve beside this one (e.g. the commit an issue measured)")
    args = ap.parse_args()
    from umr.retrieval.cpu_memory import keep_freed_memory

    keep_freed_memory()  # what is measured in this process runs as umr's own processes run it
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine

    enc = load_encoder("lit-base")
    with open(DATA / "flickr8k-1k" / "captions.txt", newline="") as f:
        queries = [row["caption"] for row in csv.DictReader(f)][:500]
    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-search-"))
    idx = tmp / "idx"
    t0 = time.perf_counter()
    build_index(idx, enc)
    print(f"built {N_VECTORS} vectors in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    bodies = tmp / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"text": q, "k": K}) + "\n" for q in queries))
    if args.baseline:  # its own copy: an older revision may not know --read-only
        shutil.copytree(idx, tmp / "idx-baseline")
    engine = Engine.open(idx, enc, mode="read")  # `umr serve` holds the write lock beside it
    in_process(engine, queries, 1, 20)  # warm-up
    levels = (1, 8, 32)
    modes = ["in-process", "HTTP, micro-batching", "HTTP, no batching"]
    base_name = f"HTTP, micro-batching, baseline {args.baseline}" if args.baseline else None
    if base_name:
        modes.append(base_name)
    results = {m: {c: [] for c in levels} for m in modes}
    servers = {}
    gaps, ceilings, floors, minimal_gaps = [], [], [], []
    outside = {"umr": [], "minimal": []}
    worktree = minimal = None
    minimal_port = args.port + 3
    try:
        minimal = serve_minimal(idx, minimal_port)
        http(minimal_port, str(bodies), 1, 20)  # warm-up
        servers["HTTP, micro-batching"] = (serve(idx, args.port, True), args.port)
        servers["HTTP, no batching"] = (serve(idx, args.port + 1, False, read_only=True), args.port + 1)
        if base_name:
            worktree = baseline_checkout(args.baseline, tmp)
            servers[base_name] = (serve(tmp / "idx-baseline", args.port + 2, True, code=worktree), args.port + 2)
        for _, port in servers.values():
            http(port, str(bodies), 4, 40)  # warm-up
        for r in range(args.repeats):
            ceilings.append(ceiling(engine, queries))
            gaps += paired_gap(engine, queries, args.port, str(bodies), blocks=5)
            floors.append(refused_round_trip(args.port, tmp))
            minimal_gaps += paired_gap(engine, queries, minimal_port, str(bodies), blocks=5)
            for _ in range(3):  # alternating, so drift hits both alike
                outside["umr"] += outside_route(args.port, str(bodies))
                outside["minimal"] += outside_route(minimal_port, str(bodies))
            for c in levels:
                n = args.requests if c > 1 else args.requests // 2
                results["in-process"][c].append(in_process(engine, queries, c, n))
                for mode, (_, port) in servers.items():
                    results[mode][c].append(http(port, str(bodies), c, n))
                print(f"round {r + 1} concurrency {c}: " + ", ".join(
                    f"{m} p50 {percentile(v[c][-1]['latencies_ms'], 50):.1f} ms" for m, v in results.items()), file=sys.stderr)
    finally:
        for proc in [minimal] + [proc for proc, _ in servers.values()]:
            if proc is None:
                continue
            proc.terminate()
            proc.wait(timeout=30)
        if worktree is not None:
            remove_checkout(worktree)
    rows = []
    table = {}
    for mode, by_c in results.items():
        for c in levels:
            table[(mode, c)] = summary(by_c[c])
            p50, p99, qps = table[(mode, c)]
            rows.append(f"| {mode} | {c} | {p50:.2f} | {p99:.2f} | {qps:.1f} |")
    gap = median(gaps)
    speedup = table[("HTTP, micro-batching", 32)][2] / table[("HTTP, no batching", 32)][2]
    top = median(ceilings)
    served = table[("HTTP, micro-batching", 32)][2]
    versus = ""
    if base_name:
        ratio = median([len(a["latencies_ms"]) / a["wall_s"] / (len(b["latencies_ms"]) / b["wall_s"])
                        for a, b in zip(results["HTTP, micro-batching"][32], results[base_name][32])])
        versus = (f"\n**Micro-batching throughput at concurrency 32 against {args.baseline}, served side by side: "
                  f"{ratio:.2f}x** (median of the per-round ratios).")
    verdict = (" (on this machine even the minimal service spends more than 1 ms outside its route next to this forward)"
               if median(outside["minimal"]) > 1.0 else "")
    body = f"""## Search: in-process vs HTTP (`bench/search.py`)

{N_VECTORS:,} synthetic {enc.dim}-d vectors (exact search) behind the real lit-base text encoder; real Flickr8k captions
as queries, k={K}; {args.repeats} rounds of {args.requests} requests per level (half at concurrency 1), medians; server
and load generator in separate processes on 127.0.0.1; both sides with `umr serve`'s thread settings
({", ".join(f"{k}={v}" for k, v in SERVE_ENV.items())}); {machine()}.

| mode | concurrency | p50 ms | p99 ms | QPS |
|---|---|---|---|---|
{chr(10).join(rows)}

**HTTP p50 minus in-process p50 at concurrency 1: {gap:.2f} ms** (target <= 1 ms; median of {len(gaps)} paired
blocks of 30 requests, in-process and HTTP alternating; quartiles {percentile(gaps, 25):.2f} / {percentile(gaps, 75):.2f} ms).
In-process is the Python API called from a pool of threads, each of which starts an OpenMP team of its own; the server
keeps one team, on its model thread (retrieval/cpu_threads.py), so it can answer faster than the in-process call.
The HTTP stack alone (uvicorn, middlewares, FastAPI, validation, the load generator), timed on a search refused
after validation (k=0, 422): p50 {median(floors):.2f} ms.
The least a FastAPI service can do around the same engine (`bench/minimal_server.py`: one route, a two-field
body, the search handed to one thread, no middleware or checks), measured the same way: HTTP minus in-process
{median(minimal_gaps):.2f} ms (quartiles {percentile(minimal_gaps, 25):.2f} / {percentile(minimal_gaps, 75):.2f} ms).
Per request, latency minus the server's own `took_ms` (time outside the route, {len(outside["umr"])} requests each,
the two servers alternating): `umr serve` p50 {median(outside["umr"]):.2f} ms, the minimal service
{median(outside["minimal"]):.2f} ms{verdict}; what umr adds over it is {median(outside["umr"]) - median(outside["minimal"]):.2f} ms.
**Micro-batching at concurrency 32: {served:.1f} QPS, p99 {table[("HTTP, micro-batching", 32)][1]:.0f} ms**; the ceiling
on this machine (encode + search of full batches of 32 back to back, in process) is {top:.1f} QPS, so the server
delivers {served / top:.0%} of it. Against no batching: {speedup:.2f}x.{versus}

{figure("search", bars, {f"concurrency {c}": {m: table[(m, c)][2] for m in modes} for c in levels}, ylabel="QPS",
        title="Search throughput by concurrency (medians)")}
"""
    write_section("search", body)


if __name__ == "__main__":
    main()
