"""The GPU path, checked end to end on a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

  build    the flickr8k-1k images (1,000) with lit-base, `umr index build --device cuda` and
           `--device cpu` side by side, the feature cache off: images/s of each
  serve    both indexes served at once (`umr serve --device cuda` / `--device cpu`):
           latency of lone text queries (p50, p99) and QPS at 8 connections, per server
  recall   the same 200 caption queries to both: recall@10 of the GPU build's results against
           the CPU build's (1.0: the GPU changes nothing but the speed)
It writes the section "gpu" of docs/benchmarks.md. Sized to finish in under 5 minutes.
Run: bash bench/gpu_check.sh
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, http_json, machine, median, percentile, run_loadgen, wait_until_up, write_section  # noqa: E402

QUERIES = 200


def umr(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "umr", *map(str, args)], env=env, **kw)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device here; run it on a machine with an NVIDIA GPU")
    import faiss

    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    tmp = Path(tempfile.mkdtemp(prefix="umr-gpu-check-"))
    flickr = DATA / "flickr8k-1k"
    images = sorted((flickr / "images").glob("*.jpg"))
    corpus = tmp / "images.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.name, "image": str(p)}) + "\n" for p in images))
    with open(flickr / "captions.txt", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)][:: max(1, 5000 // QUERIES)][:QUERIES]
    env = {**os.environ, "UMR_FEATURE_CACHE": "off", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    builds = {}
    for device in ("cuda", "cpu"):
        t0 = time.perf_counter()
        r = umr("index", "build", corpus, "--encoder", "lit-base", "--out", tmp / device, "--device", device,
                "--json", "--no-progress", env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the {device} build failed: {r.stderr[-2000:]}")
        builds[device] = {"wall_s": time.perf_counter() - t0, "report": json.loads(r.stdout)}
    servers, ports = {}, {"cuda": 8871, "cpu": 8872}
    try:
        for device, port in ports.items():
            servers[device] = subprocess.Popen(
                [sys.executable, "-m", "umr", "serve", str(tmp / device), "--port", str(port), "--device", device],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for device, port in ports.items():
            wait_until_up(f"http://127.0.0.1:{port}/healthz", servers[device], seconds=180)
        bodies = tmp / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"text": c, "k": 10}) + "\n" for c in captions))
        serving = {}
        for device, port in ports.items():
            run_loadgen(port, bodies, 1, 20, max_seconds=30)  # warm-up
            lone = run_loadgen(port, bodies, 1, QUERIES, max_seconds=60)
            many = run_loadgen(port, bodies, 8, 2 * QUERIES, max_seconds=60)
            serving[device] = {"p50": median(lone["latencies_ms"]), "p99": percentile(lone["latencies_ms"], 99),
                               "qps": len(many["latencies_ms"]) / many["wall_s"], "errors": lone["errors"] + many["errors"]}
        import http.client

        hits = {}
        for device, port in ports.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            hits[device] = [[h["id"] for h in http_json(conn, "POST", "/v1/search", {"text": c, "k": 10})[1]["results"]]
                            for c in captions]
            conn.close()
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    recall = sum(len(set(g) & set(c)) for g, c in zip(hits["cuda"], hits["cpu"])) / (10 * len(captions))
    top1 = sum(g[:1] == c[:1] for g, c in zip(hits["cuda"], hits["cpu"])) / len(captions)
    gpu_name = torch.cuda.get_device_name(0)
    rows = []
    for device in ("cuda", "cpu"):
        rep, s = builds[device]["report"], serving[device]
        per_s = rep.get("indexed", len(images)) / builds[device]["wall_s"]
        rows.append(f"| {device} | {per_s:.1f} | {builds[device]['wall_s']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} "
                    f"| {s['qps']:.0f} | {s['errors']} |")
    body = "\n".join([
        "## The GPU path (bench/gpu_check.sh)", "",
        f"Machine: {machine()}, {gpu_name}; FAISS {'on the GPU (faiss-gpu)' if faiss_gpu else 'on the CPU (faiss-gpu not installed)'}. "
        f"{len(images)} flickr8k-1k images with lit-base, feature cache off; {QUERIES} caption queries.", "",
        "| device | images/s (build, end to end) | build s | lone query p50 ms | p99 ms | QPS, 8 connections | errors |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"GPU build over CPU build, images/s: {rows and (len(images) / builds['cuda']['wall_s']) / (len(images) / builds['cpu']['wall_s']):.2f}x. "
        f"Recall@10 of the GPU-built index's results against the CPU-built one's: {recall:.3f} (top-1 agreement {top1:.3f}).",
        "", "Run: `bash bench/gpu_check.sh` (on a machine with an NVIDIA GPU).",
    ])
    write_section("gpu", body)


if __name__ == "__main__":
    main()
