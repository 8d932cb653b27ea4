"""umr against clip-retrieval's HTTP service, side by side in one run.

Same open_clip ViT-B-32 checkpoint for both (one with random weights, written here as
safetensors: this machine has no pretrained ViT-B-32, and speed does not depend on the values),
same vectors (the 1,000 flickr8k-1k images as umr embedded them, copied into the folder
`clip-retrieval back` reads), same real Flickr8k captions as queries, k=10. Both servers run at
once on 127.0.0.1 and are measured in turns, concurrency 1 and 16, by bench/loadgen.py in its own
process. clip-retrieval 2.45 runs in its own virtual environment (scripts/peer-venv.sh makes it).
Reported per server: QPS, p50/p99 latency and server CPU per request, medians over the rounds;
and how many of the top 10 the two servers share for the same queries (the same checkpoint and
vectors give the same answers, so the comparison is of serving alone).
Run: python bench/peer.py [--repeats 3] [--peer-python PATH]
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, ROOT, figure, machine, median, percentile, run_loadgen, wait_until_up, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402

PEER_PYTHON = Path.home() / ".cache" / "umr" / "peer-clip-retrieval" / "bin" / "python"
K = 10


def write_checkpoint(path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def build(tmp: Path, checkpoint: Path) -> tuple[Path, list[str]]:
    """The umr index, and the vectors and image paths clip-retrieval's folder is made from."""
    import numpy as np

    from umr.index import IndexStore
    from umr.index import vector_index as vi
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.indexing.pipeline import build_index

    images = sorted((DATA / "flickr8k-1k" / "images").glob("*.jpg"))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.name, "image": str(p)}) + "\n" for p in images))
    enc = load_encoder(f"openclip:ViT-B-32@{checkpoint}")
    idx = tmp / "umr-index"
    build_index(corpus, enc, idx, batch_size=32, progress=False)
    store = IndexStore.open(idx, mode="read")
    seg = store.segments[0]
    x = vi.flat_vectors(seg.faiss).copy()
    docs = store.docs.docs_at(seg.id, list(range(len(x))), seg.epoch)
    ids = [docs[r].id for r in range(len(x))]
    store.close()
    np.save(tmp / "vectors.npy", x)
    (tmp / "paths.json").write_text(json.dumps(ids))
    return idx, ids


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, path: str, bodies: Path, concurrency: int, requests: int, pid: int) -> dict:
    c0 = cpu_seconds(pid)
    res = run_loadgen(port, bodies, concurrency, requests, path, max_seconds=180)
    if res["errors"]:  # counted and reported: a peer's failures are part of the comparison
        print(f"port {port}: {res['errors']} failed requests, first {res['first_error']}", file=sys.stderr)
    res["cpu_ms_per_request"] = (cpu_seconds(pid) - c0) * 1000 / len(res["latencies_ms"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=160, help="per round at concurrency 16 (half at 1)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--port", type=int, default=18761)
    ap.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = ap.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"bench/peer.py: clip-retrieval's Python {args.peer_python} is missing; "
                 f"make it with scripts/peer-venv.sh or pass --peer-python")
    from umr.cli import SERVE_ENV

    tmp = Path(tempfile.mkdtemp(prefix="umr-bench-peer-"))
    checkpoint = tmp / "vit-b-32.safetensors"
    write_checkpoint(checkpoint)
    t0 = time.perf_counter()
    idx, ids = build(tmp, checkpoint)
    print(f"umr indexed {len(ids)} images in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    helper = str(ROOT / "bench" / "peer_clip_retrieval.py")
    subprocess.run([args.peer_python, helper, "prepare", str(tmp / "vectors.npy"), str(tmp / "paths.json"),
                    str(tmp / "clip-index")], check=True, timeout=300)

    with open(DATA / "flickr8k-1k" / "captions.txt", newline="") as f:
        queries = [row["caption"] for row in csv.DictReader(f)][:500]
    umr_bodies, peer_bodies = tmp / "umr.jsonl", tmp / "peer.jsonl"
    umr_bodies.write_text("".join(json.dumps({"text": q, "k": K}) + "\n" for q in queries))
    peer_bodies.write_text("".join(json.dumps({"text": q, "modality": "image", "num_images": K,
                                               "indice_name": "flickr"}) + "\n" for q in queries))
    umr_port, peer_port = args.port, args.port + 1
    servers = {
        "umr": (subprocess.Popen([sys.executable, "-m", "umr.cli", "serve", str(idx), "--port", str(umr_port)], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **SERVE_ENV}),
                umr_port, "/v1/search", umr_bodies),
        "clip-retrieval 2.45": (subprocess.Popen([args.peer_python, helper, "serve", str(tmp / "clip-index"), str(checkpoint),
                                                  str(peer_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                                peer_port, "/knn-service", peer_bodies),
    }
    levels = (1, args.concurrency)
    results = {name: {c: [] for c in levels} for name in servers}
    try:
        wait_until_up(f"http://127.0.0.1:{umr_port}/healthz", servers["umr"][0], 300)
        wait_until_up(f"http://127.0.0.1:{peer_port}/indices-list", servers["clip-retrieval 2.45"][0], 300)
        shared = []
        for q in queries[:50]:
            mine = [h["id"] for h in post(umr_port, "/v1/search", {"text": q, "k": K})["results"]]
            theirs = [h["image_path"] for h in post(peer_port, "/knn-service", {"text": q, "modality": "image",
                                                                                "num_images": K, "indice_name": "flickr"})]
            shared.append(len(set(mine) & set(theirs)) / K)
        for name, (proc, port, path, bodies) in servers.items():
            load(port, path, bodies, 4, 40, proc.pid)  # warm-up
        for r in range(args.repeats):
            for c in levels:
                n = args.requests if c > 1 else args.requests // 2
                for name, (proc, port, path, bodies) in servers.items():
                    results[name][c].append(load(port, path, bodies, c, n, proc.pid))
                print(f"round {r + 1} concurrency {c}: " + ", ".join(
                    f"{name} {len(v[c][-1]['latencies_ms']) / v[c][-1]['wall_s']:.1f} QPS" for name, v in results.items()),
                    file=sys.stderr)
    finally:
        for proc, *_ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows, table = [], {}
    for name, by_c in results.items():
        for c in levels:
            runs = by_c[c]
            table[(name, c)] = (median([percentile(x["latencies_ms"], 50) for x in runs]),
                                median([percentile(x["latencies_ms"], 99) for x in runs]),
                                median([len(x["latencies_ms"]) / x["wall_s"] for x in runs]),
                                median([x["cpu_ms_per_request"] for x in runs]))
            p50, p99, qps, cpu = table[(name, c)]
            failed = sum(x["errors"] for x in runs)
            rows.append(f"| {name} | {c} | {qps:.1f} | {p50:.1f} | {p99:.1f} | {cpu:.1f} | {failed} |")
    c = args.concurrency
    qps_ratio = median([len(a["latencies_ms"]) / a["wall_s"] / (len(b["latencies_ms"]) / b["wall_s"])
                        for a, b in zip(results["umr"][c], results["clip-retrieval 2.45"][c])])
    cpu_ratio = table[("umr", c)][3] / table[("clip-retrieval 2.45", c)][3]
    body = f"""## umr against clip-retrieval's server (`bench/peer.py`)

`umr serve` and `clip-retrieval back` (2.45.0, its own virtual environment) on the same open_clip ViT-B-32
checkpoint (random weights, as safetensors) and the same 1,000 flickr8k-1k image vectors, exact search, k={K};
real Flickr8k captions as text queries; both servers up at once on 127.0.0.1 and measured in turns by
bench/loadgen.py (its own process; keep-alive where the server allows it: Werkzeug closes every connection); {args.repeats} rounds of {args.requests} requests at
concurrency {c} ({args.requests // 2} at 1), medians; {machine()}.
The two return the same images: {sum(shared) / len(shared):.1%} of the top {K} shared over {len(shared)} queries.

| server | concurrency | QPS | p50 ms | p99 ms | server CPU ms per request | failed requests (all rounds) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**umr / clip-retrieval throughput at concurrency {c}: {qps_ratio:.2f}x** (median of the per-round ratios; target > 1),
at {cpu_ratio:.2f}x its CPU per request.

{figure("peer", bars, {**{f"QPS, concurrency {lvl}": {name: table[(name, lvl)][2] for name in results} for lvl in levels},
                       **{f"server CPU ms per request, concurrency {lvl}": {name: table[(name, lvl)][3] for name in results}
                          for lvl in levels}}, ylabel="median", title="umr against clip-retrieval 2.45, side by side")}
"""
    write_section("peer", body)


if __name__ == "__main__":
    main()
