"""One OpenMP team per server process (retrieval/cpu_threads.py): threads that call `alone()`
run torch and FAISS without starting helper threads of their own, so the thread that answers
queries keeps the only team and its spin-waits are not throttled.

Counted, not timed: OpenMP's helpers are the process's threads that Python did not start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = r"""
import json, os, sys, threading
from concurrent.futures import ThreadPoolExecutor

from umr.retrieval import cpu_threads

use = sys.argv[1] == "alone"


def helpers():
    return {int(t) for t in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


import faiss, numpy as np, torch  # noqa: E401 - their own thread pools exist before counting starts
import importlib.util
from PIL import Image

if importlib.util.find_spec("scipy"):  # transformers loads it with the model: its OpenBLAS starts its own threads
    import scipy.linalg  # noqa: F401

start = helpers()
if use:
    cpu_threads.alone()  # as `umr serve` does before it loads the model
from umr.retrieval.encoders import load_encoder

enc = load_encoder("lit-base")
texts = [line.strip() for line in open(sys.argv[2])][:256]
images = torch.stack([enc.preprocess_image(Image.open(p).convert("RGB")) for p in sys.argv[3:]])
rng = np.random.default_rng(0)
index = faiss.IndexFlatIP(256)
index.add(rng.standard_normal((50_000, 256)).astype("float32"))
queries = rng.standard_normal((256, 256)).astype("float32")


def work(gate=None):
    if gate is not None:
        gate.wait()  # each task on its own thread
    enc.embed_texts(texts)
    enc.embed_images(images)
    index.search(queries, 10)


work()  # the main thread: loading and a first forward
main = helpers() - start
model = ThreadPoolExecutor(1)
model.submit(work).result()  # the thread that answers queries: it keeps its team
kept = helpers() - start - main
gate = threading.Barrier(3)
others = ThreadPoolExecutor(3)
run = cpu_threads.alone_then(work) if use else work
list(others.map(lambda _: run(gate), range(3)))  # adds, image decoding, checkpoints
extra = helpers() - start - main - kept
print(json.dumps({"main": len(main), "model": len(kept), "others": len(extra), "cores": os.cpu_count()}))
"""


def scenario(tmp_path: Path, flickr, mode: str, omp_threads: int = 2) -> dict:
    import csv

    with open(flickr / "captions.txt", newline="") as f:
        (tmp_path / "texts.txt").write_text("".join(row["caption"] + "\n" for row in csv.DictReader(f)))
    images = sorted((flickr / "images").glob("*.jpg"))[:8]
    out = subprocess.run([sys.executable, "-c", SCENARIO, mode, str(tmp_path / "texts.txt"), *map(str, images)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": str(omp_threads)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three processes loading lit-base: the full suite (make test), not the inner loop
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_threads_that_run_alone_start_no_helpers_and_the_model_thread_keeps_its_team(tmp_path, flickr):
    # Threads that are neither Python's nor OpenMP's (a library's own) are counted by a run with
    # no OpenMP parallelism at all; each phase is compared with it.
    none = scenario(tmp_path, flickr, "plain", omp_threads=1)
    with_alone = scenario(tmp_path, flickr, "alone")
    without = scenario(tmp_path, flickr, "plain")
    # OMP_NUM_THREADS=2: a team is one helper per runtime (torch's and FAISS's).
    assert without["main"] > none["main"] and without["others"] >= none["others"] + 3  # the count sees teams
    assert with_alone["main"] == none["main"]  # loading and a first forward on the main thread, as `umr serve` does
    assert with_alone["model"] > none["model"]  # the query thread still gets its team
    assert with_alone["others"] == none["others"]  # three threads ran the same work without a helper between them
