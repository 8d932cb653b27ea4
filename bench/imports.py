"""An import of precomputed vectors with its ingest keeping freed memory, against glibc's defaults.

`umr index build --vectors` keeps freed memory while it ingests (its batches of rows are equal
blocks a heap reuses) and returns to glibc's defaults for FAISS training and the recall tuning
(retrieval/cpu_memory.py `keeping_freed_memory`). This runs the same import, as a user runs
it, alternately as umr does and with UMR_MALLOC=system (glibc's defaults throughout), and
reports each run's ingest rate, its whole time, its page faults and its peak anonymous memory,
with the per-pair ratios beside the medians.

Run: python bench/imports.py [--n 2000000] [--dim 256] [--repeats 3] [--budget 2G] [--work DIR]
The vectors are bench/large.py's (clustered, written once under --work and reused).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, median, run_sampling_memory, write_section  # noqa: E402
from bench.large import ENCODER, ensure_vectors, vector_flags  # noqa: E402

MODES = {"umr": "ingest keeps freed memory (umr's default)", "system": "glibc's defaults throughout (UMR_MALLOC=system)"}


def one_import(work: Path, mode: str, args) -> dict:
    out = work / f"index-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "UMR_MALLOC"}
    if mode == "system":
        env["UMR_MALLOC"] = "system"
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt  # a reaped child's own, from its fork on
    t = time.perf_counter()
    done, peaks = run_sampling_memory([
        str(Path(sys.executable).parent / "umr"), "index", "build", "--vectors", str(work / "emb.npy"), "--ids",
        str(work / "ids.jsonl"), "--encoder", ENCODER.format(dim=args.dim), "--out", str(out), "--memory-budget",
        args.budget, "--vector-dtype", "float16", "--json", "--no-progress",
        *(["--target-recall", str(args.target_recall)] if args.target_recall else [])], env=env)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"import failed ({mode}): {done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    report = json.loads(done.stdout)
    return {"ingest": args.n / report["seconds"], "wall": wall, "anon": peaks["RssAnon"],
            "faults": resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults}


def main() -> None:
    ap = argparse.ArgumentParser()
    vector_flags(ap, 2_000_000, "/tmp/umr-bench-imports")
    ap.add_argument("--target-recall", type=float, default=0.95, help="passed to the build (0: no tuning)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    ensure_vectors(work, args.n, args.dim, args.clusters)
    runs = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in (MODES if r % 2 == 0 else reversed(MODES)):  # alternating which goes first
            runs[mode].append(one_import(work, mode, args))
            print(r, mode, {k: round(v) for k, v in runs[mode][-1].items()}, flush=True)

    def ratios(key):
        return ", ".join(f"{u[key] / s[key]:.2f}" for u, s in zip(runs["umr"], runs["system"]))

    lines = [f"{machine()}; {args.n:,} x {args.dim} clustered vectors (bench/large.py's), `umr index build --vectors "
             f"--memory-budget {args.budget} --vector-dtype float16"
             f"{f' --target-recall {args.target_recall}' if args.target_recall else ''}`; {args.repeats} runs of each, "
             "alternating; peaks sampled every 0.25 s.", "",
             "| malloc | ingest, vectors/s | whole import, s | page faults | peak anonymous memory, MiB |",
             "|---|---|---|---|---|"]
    for mode, words in MODES.items():
        rs = runs[mode]
        lines.append(f"| {words} | {median([x['ingest'] for x in rs]):,.0f} | {median([x['wall'] for x in rs]):.0f} | "
                     f"{median([x['faults'] for x in rs]):,.0f} | {median([x['anon'] for x in rs]):,.0f} |")
    lines += ["", f"Per pair, umr's against glibc's defaults: ingest {ratios('ingest')}; whole import {ratios('wall')}; "
                  f"peak anonymous memory {ratios('anon')}.", "",
              "The ingest reads, checks and stores 65,536 rows at a time: equal blocks that a heap keeping freed "
              "memory serves again from the same pages. FAISS training and the recall tuning after it allocate "
              "uneven arrays, which kept memory would hold to the end (a 2M import peaked 30% higher when the whole "
              "command kept it), so they run at glibc's values (blocks of 32 MiB and more mapped afresh, "
              "retrieval/cpu_memory.py). The page faults are the whole command's."]
    write_section("imports", "## Importing precomputed vectors: kept memory in the ingest (`bench/imports.py`)\n\n"
                  + "\n".join(lines))


if __name__ == "__main__":
    main()
