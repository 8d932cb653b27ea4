"""SIGKILLs at random points of every kind of write, each followed by a restart and a verifier.

Kinds, in turn: a server taking HTTP adds and deletes (with background FAISS checkpoints every
few rows, so kills land inside checkpoints too), `umr index compact`, `umr update` (activating
a new version, which creates a segment). After each kill: `umr index verify` (read-only) must
find nothing damaged; then the index is opened for writing (what the next `umr serve` does)
and checked: every acknowledged add is there with its text, every acknowledged delete is gone
(and in no search result), and every stored document's own vector finds it first. Requests in
flight at the kill may land or not; they are not counted either way. All traffic is 127.0.0.1;
every loop is bounded in count and time.
Run: python bench/chaos.py [--kills 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, figure, machine, median, write_section  # noqa: E402
from umr.plots import lines  # noqa: E402

ENCODER = "tiny-clip"
KINDS = ("http writes", "compaction", "umr update")


def umr(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(env or os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "umr.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def free_port() -> int:
    from umr.demo import free_port as fp

    return fp()


class Ledger:
    """What the server acknowledged: the last text of every id added, the ids deleted after
    their last add, and the ids whose state is unknown: requests in flight (at a kill, say),
    and ids two requests changed at overlapping times (the server may have applied them in
    either order), until a later request on the id alone settles it."""

    def __init__(self):
        self.present: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.overlapped: set[str] = set()
        self.touched: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def unknown(self) -> set[str]:
        return {i for i, n in self.in_flight.items() if n} | self.overlapped

    def start(self, ids) -> dict:
        """Begin a request on `ids`; returns its tokens for `done`."""
        tokens = {}
        for i in ids:
            n = self.in_flight.get(i, 0)
            self.touched[i] = self.touched.get(i, 0) + 1
            tokens[i] = (self.touched[i], n == 0)
            self.in_flight[i] = n + 1
        return tokens

    def done(self, tokens: dict, applied) -> None:
        """`applied`: the acknowledged effect to record per id, or None when the request failed.
        A request no other one on the same id overlapped settles that id; one that overlapped
        leaves it unknown."""
        for i, (touch, was_idle) in tokens.items():
            self.in_flight[i] -= 1
            alone = was_idle and self.touched[i] == touch
            if not alone:
                self.overlapped.add(i)
            elif applied is not None:
                self.overlapped.discard(i)
                applied(i)


def http_writes(index: Path, ledger: Ledger, rng: random.Random, round_no: int) -> dict:
    import httpx

    port = free_port()
    proc = umr("serve", index, "--host", "127.0.0.1", "--port", port, "--checkpoint-rows", "15",
               "--checkpoint-seconds", "0.5")
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=10) as c:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            proc.kill()
            raise RuntimeError("server did not start: " + proc.stderr.read()[-2000:])
        started = time.perf_counter() - t0
        stop = threading.Event()
        acks = {"adds": 0, "deletes": 0, "errors": 0}

        def writer(w):
            n = 0
            with httpx.Client(base_url=url, timeout=10) as cw:
                while not stop.is_set() and n < 2000:
                    n += 1
                    with ledger.lock:
                        live = list(ledger.present)
                    if live and rng.random() < 0.3:
                        victim = rng.choice(live)
                        with ledger.lock:
                            tokens = ledger.start([victim])
                        try:
                            r = cw.delete(f"/v1/documents/{victim}")
                        except httpx.TransportError:
                            return  # killed: the victim's fate is unknown

                        def deleted(i):
                            ledger.present.pop(i, None)
                            ledger.deleted.add(i)

                        with ledger.lock:
                            acks["deletes"] += r.status_code == 200
                            ledger.done(tokens, deleted if r.status_code == 200 else None)
                        continue
                    ids = [f"r{round_no}-w{w}-{n}-{j}" for j in range(rng.randint(1, 8))]
                    if live and rng.random() < 0.2:
                        ids[0] = rng.choice(live)  # a replacement: leaves a dead row behind
                    docs = [{"id": i, "text": f"chaos text {i} {rng.random():.6f}"} for i in ids]
                    with ledger.lock:
                        tokens = ledger.start(ids)
                    try:
                        r = cw.post("/v1/documents", json={"documents": docs})
                    except httpx.TransportError:
                        return
                    texts = {d["id"]: d["text"] for d in docs}

                    def added(i):
                        ledger.present[i] = texts[i]
                        ledger.deleted.discard(i)

                    with ledger.lock:
                        acks["adds" if r.status_code == 200 else "errors"] += len(docs) if r.status_code == 200 else 1
                        ledger.done(tokens, added if r.status_code == 200 else None)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 2.5))
        proc.send_signal(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    proc.wait(timeout=30)
    with ledger.lock:  # requests cut off by the kill: their ids stay unknown until a later one settles them
        for i, n in ledger.in_flight.items():
            if n:
                ledger.overlapped.add(i)
                ledger.in_flight[i] = 0
    return {"start_s": started, **acks}


class KillClock:
    """When to kill a command: uniform over 1.25 x its expected run time, which is learned as
    the index grows (a run that finished tells its time; a kill says it takes longer than
    that), so kills land early, late (in the commit and the activation) and sometimes after
    the end."""

    def __init__(self, guess_s: float = 4.0):
        self.expected = guess_s

    def pick(self, rng: random.Random) -> float:
        return rng.uniform(0.05, 1.25 * self.expected)

    def learn(self, elapsed: float, finished: bool) -> None:
        self.expected = elapsed if finished else max(self.expected, elapsed * 1.2)


def killed_command(index: Path, rng: random.Random, args: list, clock: KillClock) -> dict:
    t0 = time.perf_counter()
    proc = umr(*args)
    deadline = t0 + clock.pick(rng)
    while time.perf_counter() < deadline and proc.poll() is None:
        time.sleep(0.01)
    finished = proc.poll() is not None
    elapsed = time.perf_counter() - t0
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    clock.learn(elapsed, finished)
    return {"finished before the kill": finished, "rc": proc.returncode}


def verify_after(index: Path, ledger: Ledger, rng: random.Random) -> dict:
    """Restart checks. Returns counts of lost, resurrected, inconsistent and corrupt findings."""
    import numpy as np

    from umr.index import IndexStore

    from umr.index.search_plan import SearchPlan
    from umr.index.errors import NotFound
    from umr.index.verify import verify

    out = {"lost": 0, "resurrected": 0, "inconsistent": 0, "corrupt": 0, "problems": []}
    report = verify(index)  # read-only, as a reader beside a restarted server would see it
    if not report.ok:
        out["corrupt"] += 1
        out["problems"].append(report.fatal or "; ".join(report.problems)[:300])
        if report.fatal:
            return out
    t0 = time.perf_counter()
    store = IndexStore.open(index)  # what the next writer does: replays rows past the checkpoints
    out["reopen_s"] = time.perf_counter() - t0
    try:
        if store.repairs:
            out["corrupt"] += 1
            out["problems"].append("; ".join(store.repairs)[:300])
        unknown = ledger.unknown
        out["expected"] = len(ledger.present.keys() - unknown)
        for doc_id, text in ledger.present.items():
            if doc_id in unknown:
                continue
            try:
                got = store.get(doc_id).text
            except NotFound:
                got = None
            if got != text:
                out["lost"] += 1
                out["problems"].append(f"acknowledged {doc_id!r} = {text!r}, stored {got!r}")
        for doc_id in ledger.deleted - unknown:
            try:
                store.get(doc_id)
                out["resurrected"] += 1
            except NotFound:
                pass
        # Search agrees with the store: a stored vector finds its own document first (or tied
        # first) in its segment, and no acknowledged delete is ever among the hits.
        docs = list(store.docs.iter_docs())
        for d in rng.sample(docs, min(40, len(docs))):
            _, seg_id, row = store.docs.get(d.id)
            vec = store.docs.vectors_at(seg_id, np.array([row]))
            hits = store.search(SearchPlan({s.id: vec for s in store.segments}, k=10))[0]  # cosines <= 1: its own row leads
            own = [h.score for h in hits if h.id == d.id]
            if not own or own[0] < hits[0].score - 1e-5:
                out["inconsistent"] += 1
            if any(h.id in ledger.deleted and h.id not in unknown for h in hits):
                out["resurrected"] += 1
        out["documents"] = store.count()
    finally:
        store.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="umr-chaos-"))
    index = tmp / "idx"
    corpus = tmp / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"base{i}", "text": f"base document {i}"}) + "\n" for i in range(300)))
    p = umr("index", "build", corpus, "--encoder", ENCODER, "--out", index, "--no-progress")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    ledger = Ledger()
    ledger.present.update({f"base{i}": f"base document {i}" for i in range(300)})
    totals = {k: {"kills": 0, "lost": 0, "resurrected": 0, "inconsistent": 0, "corrupt": 0} for k in KINDS}
    acks = {"adds": 0, "deletes": 0}
    reopen, starts, problems = [], [], []
    counts = {"acknowledged (a kill's writes in flight excluded)": [], "of those, found after the reopen": [],
              "documents in the index": []}
    version = 0
    completed = {"compaction": 0, "umr update": 0}
    clocks = {"compaction": KillClock(), "umr update": KillClock()}
    t_start = time.perf_counter()
    for i in range(a.kills):
        kind = KINDS[0] if i % 4 in (0, 1) else KINDS[1 + (i // 4) % 2]
        if kind == "http writes":
            got = http_writes(index, ledger, rng, i)
            acks["adds"] += got["adds"]
            acks["deletes"] += got["deletes"]
            starts.append(got["start_s"])
        elif kind == "compaction":
            completed[kind] += killed_command(index, rng, ["index", "compact", index],
                                              clocks[kind])["finished before the kill"]
        else:
            version += 1
            completed[kind] += killed_command(index, rng, ["update", index, "--encoder", f"{ENCODER}:{version}",
                                                           "--force"], clocks[kind])["finished before the kill"]
        found = verify_after(index, ledger, rng)
        reopen.append(found.get("reopen_s", float("nan")))
        for series, value in zip(counts.values(), (found.get("expected", 0), found.get("expected", 0) - found["lost"],
                                                   found.get("documents", 0))):
            series.append(value)
        t = totals[kind]
        t["kills"] += 1
        for key in ("lost", "resurrected", "inconsistent", "corrupt"):
            t[key] += found[key]
        problems += [f"kill {i} ({kind}): {p}" for p in found["problems"]]
        print(f"kill {i:3d} {kind:12s} lost {found['lost']} resurrected {found['resurrected']} "
              f"inconsistent {found['inconsistent']} corrupt {found['corrupt']} docs {found.get('documents')}",
              file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t_start
    rows = "\n".join(f"| {k} | {t['kills']} | {t['lost']} | {t['resurrected']} | {t['inconsistent']} | {t['corrupt']} |"
                     for k, t in totals.items())
    body = f"""## Chaos: SIGKILLs during writes (`bench/chaos.py`)

{machine()}; {a.kills} kills in {seconds:.0f} s, seed {a.seed}, encoder `{ENCODER}` (content does not matter
here), 300 documents to start. Each kill is followed by `umr index verify` (read-only) and a writer's reopen, then
every acknowledged write is checked. HTTP writes: two clients adding 1-8 documents per request (a fifth of them
replacing a live one) and deleting, with background checkpoints every 15 rows or 0.5 s, killed after 0.2-2.5 s.
Compaction and `umr update` (activating `{ENCODER}:N`, a new segment each time it completes) killed at a uniform
time over 1.25x their run time as learned during the run (so some finish first).

| killed during | kills | acknowledged writes lost | deletes undone | search disagrees with store | damaged files found |
|---|---|---|---|---|---|
{rows}

Acknowledged over the run: {acks['adds']} adds, {acks['deletes']} deletes; {len(ledger.present)} documents
expected at the end. Finished before their kill: {completed['compaction']} compactions, {completed['umr update']}
updates (the others were killed midway). Reopen after a kill (verify excluded): median {median(reopen):.2f} s, max {max(reopen):.2f} s;
server start to healthy: median {median(starts):.1f} s.

{figure("chaos", lines, {name: (list(range(1, len(v) + 1)), v) for name, v in counts.items()}, xlabel="kill",
        ylabel="documents", title="Documents after each SIGKILL", overlaid=True)}
""" + ("\nProblems:\n" + "\n".join(f"- {p}" for p in problems[:20]) if problems else "")
    write_section("chaos", body)


if __name__ == "__main__":
    main()
