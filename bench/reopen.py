"""Opening a large index read-only, and reopening it as a read-only server does after each
compaction of its writer, against a revision before the packed row state and the carried check.

Each run is a fresh process that opens the index's store read-only (the document store's
integrity check, each segment's alive mask and modality codes, the FAISS checkpoint mapped)
and then opens it again as `retrieval/engine_swap.py reopened` does: on this code it passes the
identity of the document store it checked, which an older revision has no way to take. Fresh
processes of this code and of --baseline alternate, --repeats of each; the files are in the
page cache throughout (each run reads them), so the figures are CPU, not disk.

Run: python bench/reopen.py [--n 2000000] [--dim 256] [--budget 400M] [--repeats 3] [--baseline REV] [--work DIR]
The vectors are bench/large.py's (clustered, written once under --work and reused), imported
once with `umr index build --vectors` into --work/index, which later runs reuse.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, baseline_checkout, machine, median, remove_checkout, write_section  # noqa: E402
from bench.large import ENCODER, ensure_vectors, vector_flags  # noqa: E402

# Runs under either revision's code: `python -c` puts the checkout it runs in first on sys.path.
CHILD = """
import json, sys, time
from umr.index.store import IndexStore
t = time.perf_counter(); first = IndexStore.open(sys.argv[1], "read"); opened = time.perf_counter() - t
carried = {"checked_file": first.docs.checked_file} if hasattr(first.docs, "checked_file") else {}
t = time.perf_counter(); again = IndexStore.open(sys.argv[1], "read", **carried); reopened = time.perf_counter() - t
seg = first.segments[0]
t = time.perf_counter(); first.docs.row_state(seg.id, len(seg.alive)); rows = time.perf_counter() - t
assert (again.segments[0].alive == seg.alive).all() and (again.segments[0].codes == seg.codes).all()
print(json.dumps({"open": opened, "reopen": reopened, "row_state": rows, "count": again.count(),
                  "alive": int(seg.alive.sum())}))
"""


def one_run(code: Path, index: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(index)], cwd=code, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        sys.exit(f"open failed under {code}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_index(work: Path, args) -> Path:
    index = work / "index"
    marker = index / "bench-reopen.json"
    wanted = {"n": args.n, "dim": args.dim, "budget": args.budget}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return index
    shutil.rmtree(index, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "umr"), "index", "build", "--vectors", str(work / "emb.npy"),
                    "--ids", str(work / "ids.jsonl"), "--encoder", ENCODER.format(dim=args.dim), "--out", str(index),
                    "--memory-budget", args.budget, "--vector-dtype", "float16", "--no-progress"], check=True)
    print(f"imported {args.n:,} vectors in {time.perf_counter() - t:.0f} s", flush=True)
    marker.write_text(json.dumps(wanted))
    return index


def main() -> None:
    ap = argparse.ArgumentParser()
    vector_flags(ap, 2_000_000, "/tmp/umr-bench-reopen")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="fac2c18", help="a revision before the packed row state (default fac2c18)")
    args = ap.parse_args()
    work = Path(args.work)
    ensure_vectors(work, args.n, args.dim, args.clusters)
    index = ensure_index(work, args)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_checkout(args.baseline, Path(tmp))
        try:
            codes = {"now": ROOT, "baseline": baseline}
            runs = {name: [] for name in codes}
            for r in range(args.repeats):
                for name in (codes if r % 2 == 0 else reversed(codes)):  # alternating which goes first
                    runs[name].append(one_run(codes[name], index))
                    print(r, name, {k: round(v, 2) for k, v in runs[name][-1].items()}, flush=True)
        finally:
            remove_checkout(baseline)
    counts = {(x["count"], x["alive"]) for rs in runs.values() for x in rs}
    if len(counts) != 1:
        sys.exit(f"the revisions disagree on the index's documents: {counts}")

    def cell(name, key):
        return f"{median([x[key] for x in runs[name]]):.2f} ({', '.join(f'{x[key]:.2f}' for x in runs[name])})"

    def ratios(key):
        return ", ".join(f"{b[key] / n[key]:.1f}" for n, b in zip(runs["now"], runs["baseline"]))

    size = sum(f.stat().st_size for f in index.rglob("*") if f.is_file())
    lines = [f"{machine()}; {args.n:,} x {args.dim} vectors imported with `umr index build --vectors --memory-budget "
             f"{args.budget} --vector-dtype float16` ({size / 1e9:.2f} GB on disk, docs.sqlite "
             f"{(index / 'docs.sqlite').stat().st_size / 1e9:.2f} GB); fresh processes alternating, {args.repeats} of "
             f"each; medians, each run in brackets; seconds.", "",
             "| code | open read-only (store) | reopen, as a following server does | alive mask and modality codes |",
             "|---|---|---|---|"]
    for name, words in (("now", "umr now"), ("baseline", f"before ({args.baseline})")):
        lines.append(f"| {words} | {cell(name, 'open')} | {cell(name, 'reopen')} | {cell(name, 'row_state')} |")
    lines += ["", f"Per pair, before / now: open {ratios('open')}; reopen {ratios('reopen')}; row state "
                  f"{ratios('row_state')}.", "",
              "An open runs SQLite's integrity check on a document store of up to 2 GB and reads every row's alive "
              "flag and modality. The row state now comes back from SQLite as one string (index/row_state.py, "
              "checked against the row count and two weighted sums before it is used); a reopen skips the "
              "integrity check where the document store is still the file this process checked and held open "
              "(index/integrity.py `open_docstore`). The encoder, which `umr serve` loads once and a reopen "
              "keeps, is not in these figures.", "",
              f"Run: `python bench/reopen.py --n {args.n} --budget {args.budget} --repeats {args.repeats}`."]
    write_section("reopen", "## Opening and reopening a large index read-only (`bench/reopen.py`)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
