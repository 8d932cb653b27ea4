"""The Ray build against the single-process build, side by side, on this machine.

Both build the 1,000 flickr8k-1k photos (plus one caption per photo as a text item) with
lit-base, alternating, REPEATS times each, into fresh indexes:
  single  build_index(): reading, decoding in threads, forward, commits, FAISS
  ray     build_index(ray=...): the same corpus in shards on a local Ray cluster (2 CPUs, started
          for each run, its start-up reported apart): preprocessing tasks, one model actor,
          shards written, then merged into the index; run twice, with the model actor keeping
          freed memory (what umr does) and with glibc's defaults (UMR_MALLOC=system in the
          cluster's environment), alternating which goes first
Reported: items/s end to end (medians), their ratio (Ray's overhead on one machine), and the
Ray build's encode and merge times. A Ray build pays a fixed cost per run (worker processes,
one model load per actor), so the ratio improves with the corpus. This process keeps freed
memory, as the CLI's does (retrieval/cpu_memory.py).
Run: python bench/distributed.py [--repeats 3] [--limit 1000]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, figure, machine, median, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402

BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    import csv

    import ray

    from umr.retrieval.cpu_memory import keep_freed_memory
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.indexing.pipeline import build_index

    flickr = DATA / "flickr8k-1k"
    images = sorted((flickr / "images").glob("*.jpg"))[: args.limit]
    captions = {}
    with open(flickr / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], row["caption"])
    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-ray-"))
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w") as f:
        for p in images:
            f.write(json.dumps({"id": p.name, "image": str(p)}) + "\n")
            f.write(json.dumps({"id": f"{p.name}#caption", "text": captions[p.name]}) + "\n")
    n_items = 2 * len(images)
    keep_freed_memory()
    enc = load_encoder("lit-base")
    starts: list[float] = []

    def ray_build(out: Path, malloc: str) -> dict:
        """A Ray build on a cluster started for it, whose workers see UMR_MALLOC=`malloc`."""
        os.environ["UMR_MALLOC"] = malloc  # the cluster's processes inherit this process's environment
        try:
            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            starts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = build_index(corpus, enc, out, batch_size=BATCH, progress=False, ray="auto",
                                 shard_size=args.shard_size)
            return {"rate": n_items / (time.perf_counter() - t0), **report.ray}
        finally:
            ray.shutdown()
            os.environ.pop("UMR_MALLOC")

    single, dist, system, encode_s, merge_s = [], [], [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        build_index(corpus, enc, tmp / f"single{r}", batch_size=BATCH, progress=False)
        single.append(n_items / (time.perf_counter() - t0))
        runs = {}
        for malloc in (("keep", "system") if r % 2 == 0 else ("system", "keep")):
            runs[malloc] = ray_build(tmp / f"ray-{malloc}{r}", malloc)
        dist.append(runs["keep"]["rate"])
        system.append(runs["system"]["rate"])
        encode_s.append(runs["keep"]["encode_s"])
        merge_s.append(runs["keep"]["merge_s"])
        print(f"run {r + 1}: single {single[-1]:.1f} items/s, ray {dist[-1]:.1f} items/s "
              f"(encode {encode_s[-1]:.1f}s, merge {merge_s[-1]:.2f}s), ray with glibc's defaults in its "
              f"actor {system[-1]:.1f} items/s", file=sys.stderr)
    ratio = median([d / s for d, s in zip(dist, single)])
    kept_gain = median([d / s for d, s in zip(dist, system)])
    start_s = median(starts)
    body = f"""## Distributed build on one machine (`bench/distributed.py`)

{len(images):,} flickr8k-1k photos and a caption for each ({n_items:,} items), lit-base, batch {BATCH}; the
single-process build and `build_index(ray=...)` (shards of {args.shard_size}, one model actor and
preprocessing tasks on a local 2-CPU Ray cluster) alternate, {args.repeats} runs each, medians.
{machine()}. Ray cluster start-up, for each Ray run, not counted: {start_s:.1f} s (median).

| build | items/s | ratio to single | encode s | merge s |
|---|---|---|---|---|
| single process | {median(single):.1f} | 1.00 | - | - |
| Ray, local cluster | {median(dist):.1f} | {ratio:.2f} | {median(encode_s):.1f} | {median(merge_s):.2f} |
| Ray, local cluster, its actor at glibc's malloc defaults (UMR_MALLOC=system) | {median(system):.1f} | {median([d / s for d, s in zip(system, single)]):.2f} | - | - |

The model actor keeping freed memory (retrieval/cpu_memory.py): **{kept_gain:.2f}x** the Ray build with
glibc's defaults (median of per-run ratios).

A CPU model actor reserves one CPU of the two it is counted for and runs its forward on both
(`torch.set_num_threads`; Ray sets OMP_NUM_THREADS to the one it reserves), as the single process
runs its forward on every core beside its preparation workers. On two cores the Ray build cannot be faster: it runs the same forward on the same cores and pays
for worker processes, one model load per actor and moving preprocessed images through the
object store. What it buys is that the same command runs on a cluster (README, "Distributed
builds"), where actors multiply with nodes and GPUs. The merge of the shards into the document
store took {median(merge_s):.2f} s here for {n_items:,} items; what follows it (training and filling
FAISS) is the same step as in any build.

{figure("distributed", bars, {"items/s (median)": {"single process": median(single), "Ray, local cluster": median(dist)}},
        ylabel="items/s", title=f"Index build of {n_items:,} items on one machine ({os.cpu_count()} cores)")}
"""
    write_section("distributed", body)


if __name__ == "__main__":
    main()
