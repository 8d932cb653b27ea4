"""Helpers shared by the benchmarks: data paths, medians, and the docs/benchmarks.md writer."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def _data() -> Path:
    """../shared/data beside the clone; a device machine gets only the working tree, so there it
    is carried inside it (shared/data) or named by UMR_DATA."""
    if os.environ.get("UMR_DATA"):
        return Path(os.environ["UMR_DATA"])
    beside, inside = ROOT.parent / "shared" / "data", ROOT / "shared" / "data"
    return inside if not beside.is_dir() and inside.is_dir() else beside


DATA = _data()
DOC = ROOT / "docs" / "benchmarks.md"


def baseline_checkout(rev: str, tmp: Path) -> Path:
    """Revision `rev` of this repository checked out under `tmp`, to run beside this code."""
    where = tmp / f"baseline-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return where


def remove_checkout(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, timeout=120)


def median(xs) -> float:
    return statistics.median(xs)


def percentile(xs, p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[i]


def timed(fn, repeats):
    """(median seconds of `repeats` calls, the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return median(times), out


def clustered(rng, n: int, centers, noise: float = 0.6):
    """n unit vectors, each a random centre plus Gaussian noise of norm ~`noise`: how embeddings
    of a real corpus cluster. Drawn 100,000 at a time (memory stays bounded at millions)."""
    import numpy as np

    dim = centers.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        c = centers[rng.integers(0, len(centers), m)]
        x = c + noise * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(q, x, k):
    """Exact top-k ids by numpy's GEMM + argpartition: the reference umr's exact_topk is timed against."""
    import numpy as np

    scores = q @ x.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def run_loadgen(port: int, bodies, concurrency: int, requests: int, path: str = "/v1/search",
                max_seconds: float = 120, took: bool = False) -> dict:
    """bench/loadgen.py in its own process against 127.0.0.1:port; its JSON result."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--path", path,
                          "--bodies", str(bodies), "--concurrency", str(concurrency), "--requests", str(requests),
                          "--max-seconds", str(max_seconds)] + (["--took"] if took else []), capture_output=True, text=True, timeout=2 * max_seconds + 60)
    return json.loads(out.stdout)


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Return once `url` answers (any HTTP status); raise if the server exits or never does."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server at {url} did not start: " + proc.stderr.read().decode()[-2000:])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def figure(name: str, draw, *args, **kwargs) -> str:
    """Draw a figure with `draw(*args, out=PATH, **kwargs)` (umr.plots) into docs/figures/NAME.png,
    beside the tables; returns the Markdown that shows it."""
    path = DOC.parent / "figures" / f"{name}.png"
    draw(*args, out=path, **kwargs)
    return f"![{name}](figures/{name}.png)"


def write_section(name: str, body: str) -> None:
    """Replace the section `name` of docs/benchmarks.md (between markers), keeping the others."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nWritten by the scripts in `bench/`; each section says how to reproduce it.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(body)


def http_json(conn, method: str, path: str, body=None):
    """(status, decoded JSON) of one request on a keep-alive http.client connection."""
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null")


def connection_to_each(port: int, names, seconds: float = 120) -> dict:
    """{replica name: a keep-alive connection that replica accepted} for `umr serve --replicas`:
    a connection stays with the process that accepted it, and /healthz names that process."""
    import http.client

    found, deadline = {}, time.monotonic() + seconds
    while set(found) != set(names) and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            _, body = http_json(conn, "GET", "/healthz")
        except OSError:
            conn.close()
            time.sleep(0.3)
            continue
        name = body.get("replica", "single")
        if name in found:
            conn.close()
        else:
            found[name] = conn
    if set(found) != set(names):
        for conn in found.values():
            conn.close()
        raise RuntimeError(f"reached only {sorted(found)} of {sorted(names)}")
    return found


def proc_memory(pid: int | str = "self", pss: bool = True) -> dict:
    """Resident memory of a process in MiB: VmRSS, RssAnon, RssFile (mapped files), VmHWM (peak)
    and, with `pss`, Pss (a page mapped by k processes counts 1/k to each). Pss walks every page
    table of the process under its memory map's lock, which its own mmap and munmap then wait
    for: a sampler leaves it out."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    if not pss:
        return out
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out


def run_sampling_memory(cmd: list[str], every_s: float = 0.25, **popen) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd` to its end as subprocess.run would (stdout and stderr captured as text), and
    the peaks of its resident memory in MiB, sampled every `every_s`: anonymous and file-backed
    apart (a peak RSS alone cannot tell the memory a process holds from file pages it maps),
    and VmHWM, its own high-water mark as last read. Not getrusage(RUSAGE_CHILDREN).ru_maxrss:
    Linux starts a forked child's high-water mark at its parent's resident size and keeps it
    across exec, so a child of a process that once held 10 GB reports 10 GB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}
    done = threading.Event()

    def sample():
        while not done.wait(every_s):
            try:
                mem = proc_memory(proc.pid, pss=False)
            except (OSError, ValueError, IndexError):  # ended between two samples
                continue
            for key in peaks:
                peaks[key] = max(peaks[key], mem.get(key, 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peaks


@contextlib.contextmanager
def wide_race_window(tokenizer, pause_s: float = 0.0005):
    """Hugging Face fast tokenizers of the class of `tokenizer` (or of the one umr's Serial
    wrapper holds) pause between taking their padding and truncation settings and encoding: the
    interleaving of threads a loaded server meets now and then, met in every few seconds. The
    real tokenizer still does the encoding."""
    cls = type(getattr(tokenizer, "unwrapped", tokenizer))
    settle = cls.set_truncation_and_padding

    def slowly(self, *args, **kwargs):
        out = settle(self, *args, **kwargs)
        time.sleep(pause_s)
        return out

    cls.set_truncation_and_padding = slowly
    try:
        yield
    finally:
        cls.set_truncation_and_padding = settle
