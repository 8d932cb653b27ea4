"""The GPU path, checked end to end on a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

  forward  the image tower's own ceiling: lit-base's forward on preprocessed batches of 256
           already on the device, steady state (what the build could reach at best)
  rate     `umr index build --device cuda` of IMAGES images (the 1,000 flickr8k-1k images
           repeated under distinct ids, 20,000 by default), the feature cache off: images/s end
           to end and in the encoding loop (steady state), beside the forward ceiling
  fast     the same build with --precision float16 --image-decode device (JPEGs decoded by
           nvJPEG, resized on the GPU), and the least cosine of those options' vectors to the
           float32 CPU path's over 512 images (the bound: 0.999)
  texts    texts/s of encode_texts in calls of 512 on the device (the captions, repeated, the
           feature cache off), beside their tokenisation alone
  build    the 1,000 images with `--device cuda` and `--device cpu` side by side
  serve    both served at once (`umr serve --device cuda` / `--device cpu`): latency of lone
           text queries (p50, p99) and QPS at 8 connections, per server
  recall   the same 200 caption queries to both: recall@10 of the GPU build's results against
           the CPU build's (1.0: the GPU changes nothing but the speed)
It writes the section "gpu" of docs/benchmarks.md, naming the torch and FAISS that ran.
Targets (issue 25, H200 with 16 cores): >= 5,000 images/s end to end, >= 30,000 texts/s, lone
query p50 <= 5 ms. Sized to finish in under 5 minutes there.
Run: bash bench/gpu_check.sh   (a dry run of the code on a CPU: python bench/gpu_check.py
     --device cpu --images 200 --no-write)
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, http_json, machine, median, percentile, run_loadgen, wait_until_up, write_section  # noqa: E402

QUERIES = 200


def umr(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "umr", *map(str, args)], env=env, **kw)


def forward_ceiling(device: str, images: list[Path], batch: int = 256, rounds: int = 8) -> float:
    """Images/s of lit-base's image tower + head on batches already preprocessed and on the device."""
    import torch

    from umr.retrieval import device as dev
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.images import open_image

    dev.choose(device)
    enc = load_encoder("lit-base")
    one = [enc.preprocess_image(open_image(p, min_side=enc.image_size)) for p in images[:batch]]
    x = torch.stack((one * (batch // len(one) + 1))[:batch]).to(dev.current())
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            enc.embed_images(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            enc.embed_images(x)
        sync()
    return batch * rounds / (time.perf_counter() - t0)


def texts_per_s(device: str, captions: list[str], n: int = 20_480, call: int = 512) -> tuple[float, float]:
    """(texts/s of encode_texts in calls of `call`, texts/s of their tokenisation alone), the
    feature cache off so that every text is encoded (the captions repeat)."""
    from umr.retrieval import device as dev
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.encoders.towers import MAX_TOKENS

    dev.choose(device)
    enc = load_encoder("lit-base")
    texts = (captions * (n // len(captions) + 1))[:n]
    was = os.environ.get("UMR_FEATURE_CACHE")
    os.environ["UMR_FEATURE_CACHE"] = "off"
    try:
        for i in range(0, 4 * call, call):  # warm-up: the padded widths a call of captions meets
            enc.encode_texts(texts[i:i + call], role="document")
        t0 = time.perf_counter()
        for i in range(0, n, call):
            enc.encode_texts(texts[i:i + call], role="document")
        encoded = n / (time.perf_counter() - t0)
    finally:
        if was is None:
            del os.environ["UMR_FEATURE_CACHE"]
        else:
            os.environ["UMR_FEATURE_CACHE"] = was
    t0 = time.perf_counter()
    for i in range(0, n, call):
        enc.text.tokens.padded(texts[i:i + call], MAX_TOKENS)
    return encoded, n / (time.perf_counter() - t0)


def least_cosine_to_cpu_float32(cpu_index: Path, device: str, images: list[Path], n: int = 512) -> float:
    """The least cosine between lit-base's vectors with --precision float16 --image-decode device
    on `device` and those the CPU build stored (the float32 CPU path), over n of its images."""
    from umr.index.store import IndexStore
    from umr.retrieval import device as dev
    from umr.retrieval import numerics
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.items import Item

    store = IndexStore.open(cpu_index, mode="read")
    try:
        at = [store.docs.get(p.name) for p in images[:n]]
        cpu = np.concatenate([store.docs.vectors_at(seg, np.array([row])) for _, seg, row in at])
    finally:
        store.close()
    dev.choose(device)
    numerics.choose("float16", "device")
    try:
        enc = load_encoder("lit-base")
        items = [Item(id=p.name, image=str(p)) for p in images[:n]]
        fast = np.concatenate([enc.embed([enc.prepare(it) for it in items[i:i + 128]]) for i in range(0, n, 128)])
    finally:
        numerics.choose()
    return float((cpu * fast).sum(1).min())


def build(corpus: Path, out: Path, device: str, env: dict, *options: str) -> dict:
    t0 = time.perf_counter()
    r = umr("index", "build", corpus, "--encoder", "lit-base", "--out", out, "--device", device, *options,
            "--json", "--no-progress", env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"the {device} build failed: {r.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "report": json.loads(r.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script itself")
    ap.add_argument("--images", type=int, default=20_000, help="images in the steady-state build")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = ap.parse_args()
    from umr.retrieval.cpu_memory import keep_freed_memory

    keep_freed_memory()  # what is measured in this process runs as umr's own processes run it
    import faiss
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device here; run it on a machine with an NVIDIA GPU")
    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    tmp = Path(tempfile.mkdtemp(prefix="umr-gpu-check-"))
    flickr = DATA / "flickr8k-1k"
    images = sorted((flickr / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"gpu_check: no flickr8k-1k images in {flickr / 'images'}: put shared/data beside the clone, "
                         "carry it inside the working tree (shared/data), or name it with UMR_DATA")
    corpus = tmp / "images.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.name, "image": str(p)}) + "\n" for p in images))
    many = tmp / "many.jsonl"  # the same files under distinct ids: every one decoded and encoded again
    many.write_text("".join(json.dumps({"id": f"{i}-{images[i % len(images)].name}", "image": str(images[i % len(images)])})
                            + "\n" for i in range(args.images)))
    with open(flickr / "captions.txt", newline="") as f:
        all_captions = [row["caption"] for row in csv.DictReader(f)]
    captions = all_captions[:: max(1, 5000 // QUERIES)][:QUERIES]
    env = {**os.environ, "UMR_FEATURE_CACHE": "off", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    dev_name, other = args.device, "cpu"
    ceiling = forward_ceiling(dev_name, images)
    text_rate, token_rate = texts_per_s(dev_name, all_captions)
    rate = build(many, tmp / "many", dev_name, env)
    fast = build(many, tmp / "fast", dev_name, env, "--precision", "float16", "--image-decode", "device")
    builds = {d: build(corpus, tmp / d, d, env) for d in dict.fromkeys((dev_name, other))}
    least_cos = least_cosine_to_cpu_float32(tmp / other, dev_name, images)
    servers, ports = {}, dict(zip(builds, (8871, 8872)))
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
            busy = run_loadgen(port, bodies, 8, 2 * QUERIES, max_seconds=60)
            serving[device] = {"p50": median(lone["latencies_ms"]), "p99": percentile(lone["latencies_ms"], 99),
                               "qps": len(busy["latencies_ms"]) / busy["wall_s"], "errors": lone["errors"] + busy["errors"]}
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
    g, c = hits[dev_name], hits[other]
    recall = sum(len(set(a) & set(b)) for a, b in zip(g, c)) / (10 * len(captions))
    top1 = sum(a[:1] == b[:1] for a, b in zip(g, c)) / len(captions)
    gpu_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU (a dry run on the CPU)"
    rows = []
    for device in builds:
        rep, s = builds[device]["report"], serving[device]
        per_s = rep.get("indexed", len(images)) / builds[device]["wall_s"]
        rows.append(f"| {device} | {per_s:.1f} | {builds[device]['wall_s']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} "
                    f"| {s['qps']:.0f} | {s['errors']} |")
    n_many = rate["report"].get("indexed", args.images)
    end_to_end = n_many / rate["wall_s"]
    body = "\n".join([
        "## The GPU path (bench/gpu_check.sh)", "",
        f"Machine: {machine()}, {gpu_name}; torch {torch.__version__} (CUDA {torch.version.cuda}), FAISS {faiss.__version__} "
        f"{'on the GPU (faiss-gpu)' if faiss_gpu else 'on the CPU (no faiss-gpu loaded)'}. lit-base, feature cache off.", "",
        "| steady state | rate | target (H200, 16 cores) |", "|---|---|---|",
        f"| image tower forward alone, batches of 256 on the device | {ceiling:,.0f} images/s | |",
        f"| `umr index build --device {dev_name}`, {n_many:,} images, end to end | {end_to_end:,.0f} images/s "
        f"({end_to_end / ceiling:.2f} of the forward) | >= 5,000 |",
        f"| the same build, encoding loop only | {rate['report'].get('items_per_s', float('nan')):,.0f} images/s | |",
        f"| the same build with `--precision float16 --image-decode device`, end to end | "
        f"{n_many / fast['wall_s']:,.0f} images/s (least cosine to the float32 CPU path {least_cos:.5f}) | >= 5,000 |",
        f"| texts, encode_texts in calls of 512 (feature cache off) | {text_rate:,.0f} texts/s | >= 30,000 |",
        f"| texts, their tokenisation alone (padded batches, bulk on {os.cpu_count()} cores) | {token_rate:,.0f} texts/s | |", "",
        f"{len(images)} flickr8k-1k images built on each device and served; {QUERIES} caption queries:", "",
        "| device | images/s (build, end to end) | build s | lone query p50 ms | p99 ms | QPS, 8 connections | errors |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Recall@10 of the {dev_name}-built index's results against the CPU-built one's: {recall:.3f} "
        f"(top-1 agreement {top1:.3f}). Lone query p50 target on the GPU: <= 5 ms.",
        "", "Run: `bash bench/gpu_check.sh` (on a machine with an NVIDIA GPU; `UMR_WHEELS=DIR` without a package index).",
    ])
    if args.no_write:
        print(body)
        return
    write_section("gpu", body)


if __name__ == "__main__":
    main()
