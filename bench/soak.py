"""Soak: mixed search / add / delete / encoder swap against `umr serve` on 127.0.0.1.

Searchers, a writer (adds and deletes) and an admin that activates the next pre-registered
encoder version at even intervals run for --minutes; the server's RSS is sampled every second.
Reports 5xx (target 0), other errors, p50/p99 search latency, throughput per kind, and RSS
growth after warm-up (the first quarter of the run), which should be flat. Every loop is
bounded in count and time.
Run: python bench/soak.py [--minutes 2] [--swaps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.chaos import free_port, umr  # noqa: E402
from bench.common import figure, machine, median, percentile, write_section  # noqa: E402
from umr.plots import bars, lines  # noqa: E402

ENCODER = "tiny-clip"
ADMIN_KEY = "soak-admin-key-" + "x" * 20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--searchers", type=int, default=8)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="umr-soak-"))
    index, corpus = tmp / "idx", tmp / "c.jsonl"
    words = "red green blue dog cat bird tree car house river city boat small large old new".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(5)) + f" {i}" for i in range(2000)]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    assert umr("index", "build", corpus, "--encoder", ENCODER, "--out", index, "--no-progress").wait(timeout=900) == 0
    port = free_port()
    server = umr("serve", index, "--host", "127.0.0.1", "--port", port, env={**os.environ, "UMR_ADMIN_KEY": ADMIN_KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    headers = {"X-API-Key": ADMIN_KEY}
    stop = threading.Event()
    lock = threading.Lock()
    lat: dict[str, list[float]] = {"search": [], "add": [], "delete": [], "swap": []}
    statuses: dict[int, int] = {}
    rss: list[tuple[float, float]] = []
    failures: list[str] = []
    t_end = time.time() + a.minutes * 60

    def record(kind, status, seconds):
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            lat[kind].append(seconds)

    def searcher(i):
        r = random.Random(i)
        with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                resp = c.post("/v1/search", json={"text": r.choice(texts), "k": 10})
                record("search", resp.status_code, time.perf_counter() - t0)

    def writer():
        r = random.Random(99)
        live = []
        with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
            for n in range(1_000_000):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                if live and r.random() < 0.4:
                    resp = c.delete(f"/v1/documents/{live.pop(r.randrange(len(live)))}")
                    record("delete", resp.status_code, time.perf_counter() - t0)
                else:
                    docs = [{"id": f"s{n}-{j}", "text": r.choice(texts)} for j in range(4)]
                    resp = c.post("/v1/documents", json={"documents": docs})
                    record("add", resp.status_code, time.perf_counter() - t0)
                    if resp.status_code == 200:
                        live += [d["id"] for d in docs]
                time.sleep(0.01)

    def admin():
        """Registers the next version beside the running server (`umr update --no-activate`,
        calibrated on every segment, the newest included), then activates it over HTTP."""
        with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
            for n in range(1, a.swaps + 1):
                if stop.wait(max(0.0, (t_end - time.time()) / (a.swaps - n + 2) - 10)):
                    return
                p = umr("update", index, "--encoder", f"{ENCODER}:{n}", "--no-activate", "--force", "--json")
                out, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    with lock:
                        failures.append(f"umr update with {ENCODER}:{n}: {err.strip().splitlines()[-1][:300]}")
                    continue
                v = json.loads(out)["version"]
                t0 = time.perf_counter()
                resp = c.post("/v1/admin/encoder", json={"version": v})
                record("swap", resp.status_code, time.perf_counter() - t0)
                if resp.status_code != 200:
                    with lock:
                        failures.append(f"swap to {v}: {resp.status_code} {resp.text[:300]}")

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(a.searchers)]
    threads += [threading.Thread(target=writer), threading.Thread(target=admin)]
    t0 = time.time()
    for t in threads:
        t.start()
    while time.time() < t_end:
        rss.append((time.time() - t0, rss_mb(server.pid)))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.time() - t0
    server.terminate()
    server.wait(timeout=60)
    warm = [m for s, m in rss if s >= elapsed / 4]
    five = sum(n for s, n in statuses.items() if s >= 500)
    other = {s: n for s, n in statuses.items() if 400 <= s < 500}
    ms = lambda xs, p: percentile(xs, p) * 1000  # noqa: E731
    rows = "\n".join(f"| {k} | {len(v)} | {len(v) / elapsed:.1f} | {ms(v, 50):.1f} | {ms(v, 99):.1f} |"
                     for k, v in lat.items() if v)
    body = f"""## Soak: mixed load for {a.minutes:g} min (`bench/soak.py`)

{machine()}; `umr serve` with `{ENCODER}` over 2,000 texts, {a.searchers} searchers, one writer (adds of 4
documents, deletes), {a.swaps} encoder swaps, each to a version registered during the run with `umr update
--no-activate` beside the server (calibrated on every segment, the ones earlier swaps created included).

| requests | count | per s | p50 ms | p99 ms |
|---|---|---|---|---|
{rows}

5xx: **{five}**; 4xx: {other or 'none'} (a 409 is an add embedded by the version a swap just replaced: refused,
to be sent again, never stored in the wrong segment). Server RSS after warm-up (from {elapsed / 4:.0f} s): {min(warm):.0f} to
{max(warm):.0f} MB, {warm[-1] - warm[0]:+.0f} MB from the start of that window to the end (median
{median(warm):.0f} MB); at start {rss[0][1]:.0f} MB.

{figure("soak-latency", bars, {f"{p}th percentile": {k: ms(v, p) for k, v in lat.items() if v} for p in (50, 99)},
        ylabel="ms", title=f"Soak: latency by request kind over {a.minutes:g} min")}
{figure("soak-rss", lines, {"server RSS": ([s for s, _ in rss], [m for _, m in rss])}, xlabel="seconds",
        ylabel="MB", title="Soak: the server's resident memory")}
""" + ("\nFailures: " + "; ".join(failures) if failures else "")
    write_section("soak", body)


if __name__ == "__main__":
    main()
