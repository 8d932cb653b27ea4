"""Concurrent adds and searches over real HTTP (issue 23, part 1): every stored vector is the
encoding of its document and every answer is the one the query gets alone.

lit-base's text tower was shared by the server's threads with padding and truncation state
on one Rust tokenizer: under adds beside searches, 27 of 5,255 stored vectors and 20 of 1,876
answers were wrong (the query's own caption at cosine 0.66 instead of 1.0). Adds come in
batches of 1 to 6 texts, so both of the tower's paths (padded below 4 texts, packed from 4)
run beside the batcher's forwards, as they do in the server."""
from __future__ import annotations

import csv
import random
import threading
import time

import httpx
import numpy as np
import pytest

from bench.common import wide_race_window as race_window
from conftest import served_index
from umr.retrieval.items import Item

DEADLINE_S = 8.0  # the load runs this long, and on (up to 3x) until it has done ENOUGH of each
ENOUGH = 150  # documents added, and answers checked
WRITERS, SEARCHERS = 4, 4


def captions(flickr, n):
    with open(flickr / "captions.txt", newline="") as f:
        seen, out = set(), []
        for row in csv.DictReader(f):
            text = row["caption"].strip()
            if text not in seen:
                seen.add(text)
                out.append(text)
            if len(out) == n:
                return out
    return out


@pytest.fixture
def wide_race_window(lit):
    """The tokenizer pauses 0.5 ms between taking its settings and encoding (bench.common): the
    interleaving a loaded server meets now and then (27 wrong vectors in 40 s in the issue's run),
    met in every run of a few seconds here."""
    with race_window(lit.text.tokenizer):
        yield


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_concurrent_adds_and_searches_keep_vectors_and_answers_right(tmp_path, lit, flickr, wide_race_window):
    texts = captions(flickr, 2400)
    initial = [{"id": f"base-{i}", "text": t, "metadata": {"phase": "initial"}} for i, t in enumerate(texts[:120])]
    pool = [{"id": f"add-{i}", "text": t, "metadata": {"phase": "added"}} for i, t in enumerate(texts[120:])]
    queries = [r["text"] for r in initial[:40]]
    with served_index(tmp_path, lit, initial) as (url, engine):
        from umr.retrieval.engine import Query

        solo = {q: [(h.id, h.score) for h in engine.search([Query(q)], k=5, flt={"phase": "initial"})[0]]
                for q in queries}
        assert all(solo[q][0][0] == f"base-{i}" for i, q in enumerate(queries))
        lock = threading.Lock()
        todo = list(pool)
        added: list[dict] = []
        answers = wrong = 0
        failures: list[str] = []
        t0 = time.monotonic()

        def going() -> bool:
            elapsed = time.monotonic() - t0
            return elapsed < DEADLINE_S or (elapsed < 3 * DEADLINE_S and min(len(added), answers) < ENOUGH)

        def writer(seed):
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=60) as c:
                while going():
                    with lock:
                        batch = [todo.pop() for _ in range(min(len(todo), rng.choice((1, 2, 5, 6))))]
                    if not batch:
                        return
                    r = c.post("/v1/documents", json={"documents": batch})
                    with lock:
                        if r.status_code == 200:
                            added.extend(batch)
                        else:
                            failures.append(f"add {r.status_code} {r.text[:200]}")

        def searcher(seed):
            nonlocal answers, wrong
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=60) as c:
                while going():
                    q = rng.choice(queries)
                    r = c.post("/v1/search", json={"text": q, "k": 5, "filter": {"phase": "initial"}})
                    with lock:
                        if r.status_code != 200:
                            failures.append(f"search {r.status_code} {r.text[:200]}")
                            continue
                        got = [(h["id"], h["score"]) for h in r.json()["results"]]
                        answers += 1
                        same = [g[0] for g in got] == [s[0] for s in solo[q]] and \
                            np.allclose([g[1] for g in got], [s[1] for s in solo[q]], atol=1e-4)
                        wrong += not same

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)] + \
                  [threading.Thread(target=searcher, args=(100 + i,)) for i in range(SEARCHERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert answers >= ENOUGH and wrong == 0, f"{wrong} of {answers} answers differ from the query's solo answer"
        assert len(added) >= ENOUGH, f"only {len(added)} documents were added in {3 * DEADLINE_S} s"
        stored = []
        for doc in added:
            _, seg, row = engine.store.docs.get(doc["id"])
            stored.append(engine.store.docs.vectors_at(seg, np.array([row]))[0])
        fresh = lit.encode([Item(d["id"], d["text"]) for d in added])
        cosines = np.sum(np.stack(stored) * fresh, axis=1)
        bad = [(d["id"], round(float(c), 4)) for d, c in zip(added, cosines) if c < 0.9999]
        assert bad == [], f"{len(bad)} of {len(added)} stored vectors are not their documents' encodings: {bad[:5]}"


def test_threads_sharing_one_encoder_get_each_texts_own_vector(lit, flickr, wide_race_window):
    """The same at the encoder itself: threads embedding batches on both sides of the tower's
    packing threshold at once (without the guard: 21 wrong vectors of 621 in 3 s)."""
    from umr.retrieval.encoders.base import Prepared

    texts = captions(flickr, 300)
    solo = {t: lit.embed([Prepared(t, None)])[0] for t in texts}
    wrong, errors, done = [], [], [0]
    stop = time.monotonic() + 3.0

    def work(seed):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            batch = rng.sample(texts, rng.choice((1, 2, 3, 5, 6, 8)))
            try:
                vectors = lit.embed([Prepared(t, None) for t in batch])
            except Exception as e:  # noqa: BLE001 - collected: no call may fail
                errors.append(repr(e)[:200])
                continue
            done[0] += len(batch)
            wrong.extend(round(float(v @ solo[t]), 4) for t, v in zip(batch, vectors) if v @ solo[t] < 0.9999)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == [] and done[0] > 300, (errors[:3], wrong[:10], done[0])
