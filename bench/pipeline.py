"""The indexing pipeline: can preparation keep the forward pass busy, and does the build?

Over the 1,000 flickr8k-1k images with lit-base, in this process, alternating, REPEATS runs:
  ceiling  the build's own preparation (reading the corpus, decoding and preprocessing in
           worker processes, the default, or threads; batches assembled as for the forward
           pass) with the forward pass replaced by nothing, at 1 and 2 workers (and one per
           core when there are more); in processes also from a fresh process, which forks its
           workers as `umr index build` does (the 1 -> 2 workers figure)
  forward  the image tower + head on tensors decoded beforehand, at the build's batch size
  build    build_index() from a JSONL corpus: reading, decoding in worker processes, forward,
           committing each batch with its cursor, training/filling FAISS and saving
and over 20,480 of its captions in calls of 512 (the text side of issue 25):
  tokens   token ids (and padded batches, what a GPU forward takes) from the tokenizer's own
           wrapper, one call at a time as before, and from retrieval/encoders/token_ids.py on
           1 and 2 threads
  texts    lit-base's text forward (embed_texts) on this CPU
  memory   the forward in fresh processes, alternating: with glibc's malloc defaults (UMR_MALLOC=system)
           and with freed memory kept for reuse, as umr's own processes run (retrieval/cpu_memory.py)
  baseline with --baseline REV: the preparation ceiling (processes, 1 and 2 workers) of that git
           revision and of this code, each in a fresh process, alternating in every run
Targets (issue 25): ceiling >= 4x the forward rate, 1 -> 2 workers >= 1.8x, build >= 0.95x forward.
Run: python bench/pipeline.py [--repeats 3] [--baseline REV]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, ROOT, baseline_checkout, figure, machine, median, remove_checkout, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402

BATCH = 64
TEXT_CALL = 512


def texts_per_s(fn, texts: list[str], call: int = TEXT_CALL) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(texts), call):
        fn(texts[i : i + call])
    return len(texts) / (time.perf_counter() - t0)


def text_rates(enc, captions: list[str], n: int = 20_480) -> dict[str, float]:
    """Texts/s of tokenisation by the wrapper and in bulk, and of the text forward, side by side."""
    from umr.retrieval.encoders.towers import MAX_TOKENS
    from umr.retrieval.encoders.token_ids import BulkTokenizer

    texts = (captions * (n // len(captions) + 1))[:n]
    wrapper = enc.text.tokenizer
    bulk = {t: BulkTokenizer(wrapper, threads=t) for t in (1, 2)}
    return {
        "ids, wrapper (before)": texts_per_s(lambda b: wrapper(b, truncation=True, max_length=MAX_TOKENS)["input_ids"], texts),
        **{f"ids, bulk, {t} thread{'s' if t > 1 else ''}": texts_per_s(lambda b, k=k: k.ids(b, MAX_TOKENS), texts)
           for t, k in bulk.items()},
        "padded batch, wrapper (before)": texts_per_s(
            lambda b: wrapper(b, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"), texts),
        "padded batch, bulk, 2 threads": texts_per_s(lambda b: bulk[2].padded(b, MAX_TOKENS), texts),
        "text forward (embed_texts)": texts_per_s(enc.embed_texts, texts[:2048]),
    }


def decoded(enc, paths) -> list:
    """The images preprocessed beforehand, as PIL's path gives them, for a forward alone."""
    from umr.retrieval.images import open_image

    return [enc.preprocess_image(open_image(p, min_side=enc.image_size)) for p in paths]


def forward_rate(enc, tensors: list, batch: int = BATCH) -> float:
    """Items/s of the image tower + head alone over `tensors`, at the build's batch size."""
    from umr.retrieval.encoders.base import Prepared

    t0 = time.perf_counter()
    for i in range(0, len(tensors), batch):
        enc.embed([Prepared(None, t) for t in tensors[i : i + batch]])
    return len(tensors) / (time.perf_counter() - t0)


def ceiling(enc, corpus: Path, workers: int, kind: str, passes: int = 4) -> float:
    """Items/s of the build's preparation alone (retrieval/indexing/pipeline.py's prepared_chunks
    in worker processes or threads, batches stacked as the forward pass takes them), the forward
    replaced by nothing: one pipeline over the corpus `passes` times, its workers started once
    as a build starts them (start-up included)."""
    from umr.retrieval.device import stack_batch
    from umr.retrieval.indexing.build_steps import chunks, numbered
    from umr.retrieval.indexing.pipeline import prepared_chunks
    from umr.retrieval.corpus.readers import open_corpus

    records = numbered((rec for _ in range(passes) for rec in open_corpus(corpus, "auto")), 0)
    n, t0 = 0, time.perf_counter()
    for chunk, prepared in prepared_chunks(enc, chunks(records, BATCH), BATCH, workers, kind):
        stack_batch([p.image for p in prepared])
        n += len(chunk)
    return n / (time.perf_counter() - t0)


# Run in a fresh process with a revision's own code first on sys.path (`python -c` puts the
# working directory there): its bench.pipeline.ceiling over its own preparation.
CEILING_OF_A_REVISION = """
import json, resource, sys
from pathlib import Path
from bench.pipeline import ceiling
from umr.retrieval.encoders import load_encoder
enc = load_encoder("lit-base")
corpus = Path(sys.argv[1])
passes = 4
items = passes * sum(1 for _ in open(corpus))
ceiling(enc, corpus, 1, "processes", passes=1)  # the resize's first call, the page cache
out = {}
for w in sys.argv[2:]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, once they are reaped
    rate = ceiling(enc, corpus, int(w), "processes", passes=passes)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    out[w] = [rate, cpu / items * 1e3]
print(json.dumps(out))
"""


FORWARD_IN_A_PROCESS = """
import json, resource, sys, time
import torch
from umr.retrieval.cpu_memory import keep_freed_memory
from umr.retrieval.encoders import load_encoder
kept = keep_freed_memory()
enc = load_encoder("lit-base")
batch = torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as the resize lays it out
enc.image.features(batch)
before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(4):
    enc.image.features(batch)
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
from bench.common import proc_memory
print(json.dumps({"kept": kept, "items_per_s": 4 * 64 / wall, "faults_per_batch": (after.ru_minflt - before.ru_minflt) / 4,
                  "system_s_per_batch": (after.ru_stime - before.ru_stime) / 4, "peak_rss_mb": proc_memory()["VmHWM"]}))  # its own: ru_maxrss starts from the benchmark's size at the fork
"""


# A build as `umr index build` runs one: a fresh process that loads the encoder and builds, its
# preparation workers forked from it before any forward. Or, with "forward", the same process
# decoding the images beforehand and timing only the image forward over them, at the build's batch.
BUILD_IN_A_PROCESS = """
import json, os, resource, shutil, sys, tempfile, time
from pathlib import Path
from umr.retrieval.cpu_memory import keep_freed_memory
keep_freed_memory()
from umr.retrieval.encoders import load_encoder
enc = load_encoder("lit-base")
corpus, what, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
if what == "forward":
    from bench.pipeline import decoded, forward_rate  # this code's only: the baselines run builds
    tensors = decoded(enc, [json.loads(line)["image"] for line in open(corpus)])
    forward_rate(enc, tensors[:batch])  # warm-up
    print(json.dumps({"items_per_s": forward_rate(enc, tensors)}))
else:
    from umr.retrieval.indexing.pipeline import build_index
    out = Path(tempfile.mkdtemp(prefix="umr-bench-build-"))
    me, kids, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    report = build_index(corpus, enc, out / "idx", batch_size=batch, progress=False)
    wall = time.perf_counter() - t0
    me, kids = cpu(resource.RUSAGE_SELF) - me, cpu(resource.RUSAGE_CHILDREN) - kids  # the workers, reaped
    shutil.rmtree(out)
    print(json.dumps({"items_per_s": report.indexed / wall, "loop": report.items_per_s,
                      "busy": (me + kids) / (wall * os.cpu_count()), "workers": kids / (me + kids),
                      "forward_cpu_ms": me / report.indexed * 1e3}))
"""


def in_a_fresh_process(script: str, *args: str, code: Path = ROOT, **env: str):
    """What `script` prints as JSON, run with the code at `code` first on sys.path."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=code, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code), **env}, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"a benchmark process over {code} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def build_in_a_process(corpus: Path, what: str, code: Path = ROOT) -> dict:
    """A build ("build") or the image forward alone ("forward") of `corpus`, in a fresh process with the code at `code`."""
    return in_a_fresh_process(BUILD_IN_A_PROCESS, str(corpus), what, str(BATCH), code=code)


def forward_in_a_process(malloc: str) -> dict:
    """lit-base's image forward, batches of 64, in a fresh process with UMR_MALLOC=`malloc`."""
    return in_a_fresh_process(FORWARD_IN_A_PROCESS, UMR_MALLOC=malloc)


def memory_rows(runs: list[dict[str, dict]]) -> str:
    """The forward with glibc's defaults and with freed memory kept, as a table."""
    names = {"system": "glibc's defaults (UMR_MALLOC=system)", "keep": "freed memory kept (umr's processes)"}
    rows = [f"| {names[m]} | {median([r[m]['items_per_s'] for r in runs]):.1f} | "
            f"{median([r[m]['faults_per_batch'] for r in runs]):,.0f} | {median([r[m]['system_s_per_batch'] for r in runs]):.2f} | "
            f"{median([r[m]['peak_rss_mb'] for r in runs]):,.0f} |" for m in names]
    gain = median([r["keep"]["items_per_s"] / r["system"]["items_per_s"] for r in runs])
    return f"""
The image forward (lit-base, batches of 64) in fresh processes, alternating, {len(runs)} runs, medians
(retrieval/cpu_memory.py says why):

| malloc | items/s | page faults per batch | system CPU s per batch | peak RSS MB |
|---|---|---|---|---|
{chr(10).join(rows)}

Freed memory kept: **{gain:.2f}x** the forward rate (median of per-run ratios).
"""


def ceiling_of(code: Path, corpus: Path, workers: list[int]) -> dict[int, tuple[float, float]]:
    """(items/s, the workers' CPU ms per item) of the preparation ceiling in processes of the
    code at `code`, in a fresh process."""
    got = in_a_fresh_process(CEILING_OF_A_REVISION, str(corpus), *map(str, workers), code=code)
    return {int(w): tuple(rate_cpu) for w, rate_cpu in got.items()}


def baseline_builds(rev: str, runs: list[dict], fwd: list[float]) -> str:
    """The baseline's builds beside this code's, each in a fresh process, as sentences."""
    ours = [r["build", "this"]["items_per_s"] for r in runs]
    theirs = [r["build", "baseline"]["items_per_s"] for r in runs]
    faster = sum(a > b for a, b in zip(ours, theirs))
    return f"""
Beside {rev}'s build in the same runs (a fresh process each, alternating): {median(theirs):.1f} items/s, {median([t / f for t, f in zip(theirs, fwd)]):.3f}
of the forward; this code's / {rev}'s: **{median([a / b for a, b in zip(ours, theirs)]):.3f}x** (median of per-run ratios
{", ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))}; faster in {faster} of {len(runs)} runs); the build's own process spent
{median([r["build", "baseline"]["forward_cpu_ms"] for r in runs]):.1f} ms of CPU per image there."""


def versus_baseline(rev: str, runs: list[tuple[dict, dict]]) -> str:
    """The side-by-side ceilings as a table, with per-run ratios' medians."""
    rows = []
    for w in sorted(runs[0][0]):
        ours, theirs = [r[0][w][0] for r in runs], [r[1][w][0] for r in runs]
        cpu_ours, cpu_theirs = [r[0][w][1] for r in runs], [r[1][w][1] for r in runs]
        rows.append(f"| {w} worker{'s' if w > 1 else ''} | {median(ours):.1f} | {median(theirs):.1f} | "
                    f"{median([a / b for a, b in zip(ours, theirs)]):.3f}x | {median(cpu_ours):.3f} | {median(cpu_theirs):.3f} | "
                    f"{median([b / a for a, b in zip(cpu_ours, cpu_theirs)]):.3f}x |")
    scaling = [median([r[i][2][0] / r[i][1][0] for r in runs]) for i in (0, 1)]
    return f"""
Beside {rev}: the preparation ceiling in processes of this code and of {rev}, each in a fresh process, alternating, {len(runs)} runs
(medians; ratios are medians of per-run ratios). CPU is what the worker processes used per item, user and system: on a
machine shared with others it varies less than the rate.

| workers | this code, items/s | {rev}, items/s | ratio | this code, worker CPU ms/item | {rev}, worker CPU ms/item | {rev} / this code |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

1 -> 2 workers in these fresh processes: **{scaling[0]:.2f}x** this code, {scaling[1]:.2f}x {rev}.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--baseline", help="a git revision whose preparation ceiling to measure beside this code's")
    args = ap.parse_args()
    from umr.retrieval.cpu_memory import keep_freed_memory
    from umr.retrieval.device import default_workers

    keep_freed_memory()  # as the CLI's processes run
    from umr.retrieval.encoders import load_encoder

    images = sorted((DATA / "flickr8k-1k" / "images").glob("*.jpg"))[: args.limit]
    enc = load_encoder("lit-base")
    tensors = decoded(enc, images)
    forward_rate(enc, tensors[:BATCH])  # warm-up
    with open(DATA / "flickr8k-1k" / "captions.txt", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    enc.embed_texts(captions[:TEXT_CALL])

    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-"))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.name, "image": str(p)}) + "\n" for p in images))
    worker_counts = sorted({1, 2, default_workers()})
    kinds = ("processes", "threads")
    prep: dict[tuple[str, int], list[float]] = {(k, w): [] for k in kinds for w in worker_counts}
    raw: list[float] = []
    fresh_build: list[dict[tuple[str, str], dict]] = []  # forward and builds in fresh processes, per run
    text: dict[str, list[float]] = {}
    side_by_side: list[tuple[dict, dict]] = []
    fresh: list[dict[int, tuple[float, float]]] = []  # this code's ceiling in a fresh process, as a build forks its workers
    malloc_runs: list[dict[str, dict]] = []
    worktree = baseline_checkout(args.baseline, tmp) if args.baseline else None
    try:
        for r in range(args.repeats):
            order = ("system", "keep") if r % 2 == 0 else ("keep", "system")
            malloc_runs.append({m: forward_in_a_process(m) for m in order})
            print(f"run {r + 1}: forward in fresh processes {malloc_runs[-1]}", file=sys.stderr)
            if worktree is not None:
                first, second = (ROOT, worktree) if r % 2 == 0 else (worktree, ROOT)  # each goes first in turn
                got = {first: ceiling_of(first, corpus, [1, 2]), second: ceiling_of(second, corpus, [1, 2])}
                side_by_side.append((got[ROOT], got[worktree]))
                print(f"run {r + 1}: ceiling (items/s, worker CPU ms/item) at 1 and 2 workers, this code {side_by_side[-1][0]}, "
                      f"{args.baseline} {side_by_side[-1][1]}", file=sys.stderr)
            fresh.append(side_by_side[-1][0] if worktree is not None else ceiling_of(ROOT, corpus, [1, 2]))
            for w in worker_counts:
                for k in kinds:
                    prep[k, w].append(ceiling(enc, corpus, w, k))
            raw.append(forward_rate(enc, tensors))
            # The build beside the forward alone, each in a fresh process as `umr index build` runs
            # (and the baseline's build beside them); the order turns in every run.
            codes = [("this", ROOT)] + ([("baseline", worktree)] if worktree is not None else [])
            jobs = [("forward", "this", ROOT)] + [("build", name, code) for name, code in codes]
            got = {}
            for what, name, code in (jobs[r % len(jobs):] + jobs[: r % len(jobs)]):
                got[what, name] = build_in_a_process(corpus, what, code)
            fresh_build.append(got)
            for what, rate in text_rates(enc, captions).items():
                text.setdefault(what, []).append(rate)
            print(f"run {r + 1}: preparation {', '.join(f'{k} {w} {prep[k, w][-1]:.0f}/s' for k in kinds for w in worker_counts)}; "
                  f"forward {raw[-1]:.1f}/s here; fresh processes {({' '.join(k): round(v['items_per_s'], 1) for k, v in got.items()})}; "
                  f"texts: {', '.join(f'{w} {v[-1]:,.0f}/s' for w, v in text.items())}", file=sys.stderr)
    finally:
        if worktree is not None:
            remove_checkout(worktree)
    def of(what, name, key="items_per_s"):
        return [run[what, name][key] for run in fresh_build]

    fwd, build = of("forward", "this"), of("build", "this")
    ratios = [b / f for b, f in zip(build, fwd)]
    scaling = {k: median([b / a for a, b in zip(prep[k, 1], prep[k, 2])]) for k in kinds}
    fresh_scaling = median([f[2][0] / f[1][0] for f in fresh])
    headroom = median([c / r for c, r in zip(prep["processes", max(worker_counts)], raw)])
    bulk_gain = median([b / a for a, b in zip(text["ids, wrapper (before)"], text["ids, bulk, 2 threads"])])
    bulk_scaling = median([b / a for a, b in zip(text["ids, bulk, 1 thread"], text["ids, bulk, 2 threads"])])
    padded_gain = median([b / a for a, b in zip(text["padded batch, wrapper (before)"], text["padded batch, bulk, 2 threads"])])
    text_rows = "\n".join(f"| {w} | {median(v):,.0f} |" for w, v in text.items())
    rows = "\n".join(f"| preparation alone in {k}, {w} worker{'s' if w > 1 else ''} (forward replaced by nothing) | "
                     f"{median(prep[k, w]):.1f} |" for k in kinds for w in worker_counts)
    body = f"""## Indexing pipeline (`bench/pipeline.py`)

lit-base over {len(images)} flickr8k-1k images, batch {BATCH}, {args.repeats} alternating runs, medians; {machine()}.
Preparation: the build's own reading, decoding (libjpeg straight into a tensor; PIL in draft mode for JPEGs at least twice the
input side), preprocessing in worker processes (the default where the platform forks) or threads, and batch assembly; one pipeline over the images 4 times (4,000 items), its workers started once as
a build starts them (earlier runs started them twice in 2,000 items: about 70 ms each time, a tenth of a 2-worker pass).

| what | items/s |
|---|---|
{rows}
| forward on pre-decoded tensors (image tower + head), in this process | {median(raw):.1f} |
| forward on pre-decoded tensors, in a fresh process | {median(fwd):.1f} |
| `umr index build` in a fresh process, end to end (read, decode, forward, commit, FAISS, save; default workers: {default_workers()}) | {median(build):.1f} |
| `umr index build` in a fresh process, encoding loop only | {median(of("build", "this", "loop")):.1f} |

**Preparation ceiling / forward: {headroom:.1f}x** (target >= 4x); **1 -> 2 workers: {fresh_scaling:.2f}x** in processes forked
as `umr index build` forks them, from a fresh process that has loaded the encoder and run no forward (per run
{", ".join(f"{f[2][0] / f[1][0]:.2f}" for f in fresh)}; target >= 1.8x); {scaling["processes"]:.2f}x forked from this benchmark's own process after its
forwards (about 2 GB resident; the rows above), {scaling["threads"]:.2f}x in threads;
**build / forward: {median(ratios):.3f}**, each in a fresh process (median of per-run ratios {", ".join(f"{x:.2f}" for x in ratios)};
target >= 0.95). During the build the cores were {median(of("build", "this", "busy")):.0%} busy, and the preparation workers used
{median(of("build", "this", "workers")):.1%} of that CPU (medians); the build's own process spent {median(of("build", "this", "forward_cpu_ms")):.1f} ms
of CPU per image. Where the forward already fills every core, as on this CPU, what the preparation costs comes off the
forward's share; its workers run at idle policy, so they take no core from the forward while it runs
(retrieval/encoders/worker_priority.py).{baseline_builds(args.baseline, fresh_build, fwd) if worktree is not None else ""} For reference, the team's notes on peer systems (../shared/GUIDE.md, beside the repository) measured
clip-retrieval at 0.69 of its raw forward in steady state and 0.50 end to end.

Texts: {len(captions):,} flickr8k-1k captions repeated to 20,480, in calls of {TEXT_CALL} (the text forward on 2,048 of them),
tokenised to at most 128 tokens as lit-base does; the same runs, medians.

| what | texts/s |
|---|---|
{text_rows}

Token ids in bulk on 2 threads: **{bulk_gain:.2f}x** the wrapper's one call at a time, **{bulk_scaling:.2f}x** from 1 to 2 threads;
padded batches (what a GPU forward takes) **{padded_gain:.2f}x**. The ids are the wrapper's, the vectors the same to the bit
(tests/test_token_ids.py). On this CPU the text forward, not tokenisation, sets the rate; the threads are for a GPU's.
{memory_rows(malloc_runs)}{versus_baseline(args.baseline, side_by_side) if side_by_side else ""}
{figure("pipeline", bars, {"lit-base, items/s": {"forward (pre-decoded)": median(fwd), "umr index build, end to end": median(build),
                                                 "umr index build, encoding loop": median(of("build", "this", "loop"))}},
        ylabel="items/s (median)", title="Indexing against the encoder's forward")}
"""
    write_section("pipeline", body)


if __name__ == "__main__":
    main()
