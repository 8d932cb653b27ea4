"""An import of precomputed vectors, side by side: its ingest keeping freed memory against glibc's
defaults, or (--baseline REV) this code against an earlier revision's.

`umr index build --vectors` keeps freed memory while it ingests (its batches of rows are equal
blocks a heap reuses) and returns to glibc's defaults for FAISS training and the recall tuning
(retrieval/cpu_memory.py `keeping_freed_memory`). This runs the same import, as a user runs
it, alternately as umr does and with UMR_MALLOC=system (glibc's defaults throughout), and
reports each run's ingest rate, its whole time, its page faults and its peak anonymous memory,
with the per-pair ratios beside the medians. With --baseline REV the two sides are this code
and REV's (a git worktree), both at umr's defaults, and the table goes to section
"import-speed"; with --ingest-only too, each import ends once its ingest is done (at 10M the
FAISS stages after it take three times as long), and the table goes to "import-speed-ingest".

Run: python bench/imports.py [--n 2000000] [--dim 256] [--repeats 3] [--budget 2G] [--work DIR]
                             [--baseline REV [--ingest-only]]
The vectors are bench/large.py's (clustered, written once under --work and reused).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, baseline_checkout, machine, median, remove_checkout, run_sampling_memory, write_section  # noqa: E402
from bench.large import ENCODER, ensure_vectors, vector_flags  # noqa: E402

MODES = {"umr": "ingest keeps freed memory (umr's default)", "system": "glibc's defaults throughout (UMR_MALLOC=system)"}
CLI = "import sys; from umr.cli import main; sys.exit(main(sys.argv[1:]))"  # the checkout it runs in comes first
# --ingest-only: the same command, ended once its ingest is done (at 10M, FAISS training and
# adding take three times as long and are not what the comparison is about).
INGEST_ONLY = """
import json, os, sys, time
from umr.retrieval.indexing import vector_import
from umr.cli import main
ingest = vector_import.ingest_vectors
def timed(*a, **k):
    t = time.perf_counter()
    ingest(*a, **k)
    print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
    os._exit(0)
vector_import.ingest_vectors = timed
sys.exit(main(sys.argv[1:]))
"""


def one_import(work: Path, mode: str, args, code: Path = ROOT) -> dict:
    """One import as a user runs it, under `code`'s umr; `mode` "system" at glibc's defaults."""
    out = work / f"index-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "UMR_MALLOC"}
    if mode == "system":
        env["UMR_MALLOC"] = "system"
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt  # a reaped child's own, from its fork on
    t = time.perf_counter()
    done, peaks = run_sampling_memory([
        sys.executable, "-c", INGEST_ONLY if args.ingest_only else CLI, "index", "build", "--vectors", str(work / "emb.npy"), "--ids",
        str(work / "ids.jsonl"), "--encoder", ENCODER.format(dim=args.dim), "--out", str(out), "--memory-budget",
        args.budget, "--vector-dtype", "float16", "--json", "--no-progress",
        *(["--target-recall", str(args.target_recall)] if args.target_recall else [])], env=env, cwd=code)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"import failed ({mode}, {code}): {done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ingest": args.n / report["seconds"], "wall": wall, "anon": peaks["RssAnon"],
            "faults": resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults}


def alternating(sides: dict, repeats: int, run) -> dict[str, list[dict]]:
    """`run(side)` for each side `repeats` times, each side going first in turn."""
    runs = {side: [] for side in sides}
    for r in range(repeats):
        for side in (sides if r % 2 == 0 else reversed(sides)):
            runs[side].append(run(side))
            print(r, side, {k: round(v) for k, v in runs[side][-1].items()}, flush=True)
    return runs


def table(runs: dict[str, list[dict]], words: dict[str, str], first_column: str) -> list[str]:
    lines = [f"| {first_column} | ingest, vectors/s | whole import, s | page faults | peak anonymous memory, MiB |",
             "|---|---|---|---|---|"]
    for side, label in words.items():
        rs = runs[side]
        lines.append(f"| {label} | {median([x['ingest'] for x in rs]):,.0f} | {median([x['wall'] for x in rs]):.0f} | "
                     f"{median([x['faults'] for x in rs]):,.0f} | {median([x['anon'] for x in rs]):,.0f} |")
    return lines


def ratios(runs: dict[str, list[dict]], a: str, b: str, key: str) -> str:
    return ", ".join(f"{x[key] / y[key]:.2f}" for x, y in zip(runs[a], runs[b]))


def flags(args) -> str:
    return (f"`umr index build --vectors --memory-budget {args.budget} --vector-dtype float16"
            f"{f' --target-recall {args.target_recall}' if args.target_recall else ''}`"
            f"{', ended after its ingest (--ingest-only: whole import is the ingest and the start)' if args.ingest_only else ''}")


def against_baseline(work: Path, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = {"now": ROOT, "baseline": baseline_checkout(args.baseline, Path(tmp))}
        try:
            runs = alternating(code, args.repeats, lambda side: one_import(work, side, args, code[side]))
        finally:
            remove_checkout(code["baseline"])
    words = {"now": "umr now", "baseline": f"before ({args.baseline})"}
    lines = [f"{machine()}; {args.n:,} x {args.dim} clustered vectors (bench/large.py's), {flags(args)} with plain "
             f"string ids; {args.repeats} runs of each, alternating, fresh processes; peaks sampled every 0.25 s.", "",
             *table(runs, words, "code"), "",
             f"Per pair, now against before: ingest {ratios(runs, 'now', 'baseline', 'ingest')}; whole import "
             f"{ratios(runs, 'now', 'baseline', 'wall')}; peak anonymous memory {ratios(runs, 'now', 'baseline', 'anon')}.", "",
             "What changed: a batch whose every row is a plain id with a usable vector, none repeated and none stored, "
             "is stored whole (index/documents.py `PlainDocs`: its rows zipped for SQLite, not a DocRecord per row); "
             "float16 vectors are converted once rather than three times; rows are made unit length in place. "
             "What is left is mostly SQLite's own inserts into the docs and rows tables."]
    section, scope = ("import-speed-ingest", "its ingest") if args.ingest_only else ("import-speed", "whole")
    write_section(section, f"## Importing {args.n:,} precomputed vectors, {scope}: this code against {args.baseline} "
                  f"(`bench/imports.py --baseline{' --ingest-only' if args.ingest_only else ''}`)\n\n" + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    vector_flags(ap, 2_000_000, "/tmp/umr-bench-imports")
    ap.add_argument("--target-recall", type=float, default=0.95, help="passed to the build (0: no tuning)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="compare this code with that git revision's instead of malloc settings")
    ap.add_argument("--ingest-only", action="store_true", help="end each import once its ingest is done")
    args = ap.parse_args()
    if args.ingest_only and not args.baseline:
        ap.error("--ingest-only compares code (--baseline REV); the malloc comparison needs whole imports")
    work = Path(args.work)
    ensure_vectors(work, args.n, args.dim, args.clusters)
    if args.baseline:
        against_baseline(work, args)
        return
    runs = alternating(MODES, args.repeats, lambda mode: one_import(work, mode, args))
    lines = [f"{machine()}; {args.n:,} x {args.dim} clustered vectors (bench/large.py's), {flags(args)}; "
             f"{args.repeats} runs of each, alternating; peaks sampled every 0.25 s.", "",
             *table(runs, MODES, "malloc"), "",
             f"Per pair, umr's against glibc's defaults: ingest {ratios(runs, 'umr', 'system', 'ingest')}; whole import "
             f"{ratios(runs, 'umr', 'system', 'wall')}; peak anonymous memory {ratios(runs, 'umr', 'system', 'anon')}.", "",
             "The ingest reads, checks and stores 65,536 rows at a time: equal blocks that a heap keeping freed "
             "memory serves again from the same pages. FAISS training and the recall tuning after it allocate "
             "uneven arrays, which kept memory would hold to the end (a 2M import peaked 30% higher when the whole "
             "command kept it), so they run at glibc's values (blocks of 32 MiB and more mapped afresh, "
             "retrieval/cpu_memory.py). The page faults are the whole command's."]
    write_section("imports", "## Importing precomputed vectors: kept memory in the ingest (`bench/imports.py`)\n\n"
                  + "\n".join(lines))


if __name__ == "__main__":
    main()
