import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ROOT, cli_in_process, write_jsonl
from umr.index import IndexStore
from umr.retrieval.indexing.build_steps import StrictError
from umr.retrieval.indexing.pipeline import build_index


def corpus_with_bad_records(tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81M pixels, tiny file
    return write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "text": "first"},
        {"id": "img", "image": "ok.png"},
        {"id": "missing", "image": "nope.png"},
        {"id": "corrupt", "image": "corrupt.jpg"},
        {"id": "bomb", "image": "bomb.png"},
        {"id": "a", "text": "duplicate id"},
        {"id": "b", "text": "second", "metadata": {"lang": "en"}},
    ])


def test_bad_records_are_skipped_counted_and_reported(tmp_path, tiny):
    corpus = corpus_with_bad_records(tmp_path)
    report = build_index(corpus, tiny, tmp_path / "idx", progress=False)
    reasons = {r["id"]: r["reason"] for r in report.rejections}
    assert report.indexed == 3 and report.rejected == 4
    assert "not found" in reasons["missing"]
    assert "corrupt" in reasons["corrupt"] or "readable" in reasons["corrupt"]
    assert "pixels" in reasons["bomb"]
    assert "duplicate" in reasons["a"]
    store = IndexStore.open(tmp_path / "idx")
    assert store.get("a").text == "first"  # the first record with an id wins
    assert store.manifest["build"]["report"]["rejected"] == 4


def test_a_first_batch_of_only_bad_records_commits_its_cursor_and_the_build_goes_on(tmp_path, tiny):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "m1", "image": "nope1.png"}, {"id": "m2", "image": "nope2.png"},
                                                {"id": "t1", "text": "first text"}, {"id": "t2", "text": "second text"}])
    report = build_index(corpus, tiny, tmp_path / "idx", batch_size=2, progress=False)  # crashed on an empty write
    assert report.indexed == 2 and {r["id"] for r in report.rejections} == {"m1", "m2"}
    store = IndexStore.open(tmp_path / "idx")
    assert sorted(d.id for d in store.docs.iter_docs()) == ["t1", "t2"] and store.get("t2").text == "second text"


def test_strict_makes_a_bad_record_fatal(tmp_path, tiny):
    corpus = corpus_with_bad_records(tmp_path)
    with pytest.raises(StrictError, match="missing"):
        build_index(corpus, tiny, tmp_path / "idx", strict=True, progress=False)
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx2", "--strict")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("umr: error: bad record missing")


def test_rerun_of_a_finished_build_does_nothing(tmp_path, tiny):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"t {i}"} for i in range(10)])
    build_index(corpus, tiny, tmp_path / "idx", progress=False)
    again = build_index(corpus, tiny, tmp_path / "idx", progress=False)
    assert again.already_complete and again.indexed == 10


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_resume_after_sigkill_ends_with_every_item_once(tmp_path, flickr, flickr_test):
    names, caps = flickr_test
    records = []
    for n in names[:120]:
        records.append({"id": n, "image": str(flickr / "images" / n)})
        records.append({"id": f"{n}#0", "text": caps[n][0]})
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "umr.cli", "index", "build", str(corpus), "--encoder", "lit-base", "--out", str(out),
           "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cursor, deadline = 0, time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(out / "docs.sqlite", timeout=1) as db:
                row = db.execute("SELECT value FROM meta WHERE key='build.cursor'").fetchone()
            cursor = int(row[0]) if row else 0
        except sqlite3.Error:
            pass
        if cursor >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    workers = children(proc.pid)
    assert len(workers) == len(os.sched_getaffinity(0))  # images prepared in worker processes, one per core
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 40 <= cursor < len(records)
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers)  # they die with the build
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed at record" in r.stdout
    with sqlite3.connect(out / "docs.sqlite") as db:
        ids = [x[0] for x in db.execute("SELECT id FROM docs")]
        rows = db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every item, once
    assert rows == len(records)  # and no orphan vectors from the killed run
    store = IndexStore.open(out)
    assert store.count() == len(records) and store.info()["segments"][0]["vectors_in_faiss"] == len(records)
    assert store.manifest["build"]["report"]["indexed"] == len(records)


def children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_build_refuses_another_encoder_on_a_partial_index(tmp_path, tiny):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "text": "x"}])
    build_index(corpus, tiny, tmp_path / "idx", progress=False)
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip:1", "--out", tmp_path / "idx")
    assert r.returncode == 2 and "was started with encoder tiny-clip" in r.stderr


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_resuming_with_other_index_flags_is_refused(tmp_path, tiny):
    from umr.index import IndexStore as Store

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"t {i}"} for i in range(5)])
    store = Store.create(tmp_path / "idx", tiny.record(), "flat")  # as a build killed before its end
    store.manifest["build"] = {"source": {"corpus": str(corpus.resolve()), "format": "jsonl"}}
    store.save()
    store.close()
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx", "--index", "hnsw")
    assert r.returncode == 2 and "was started with --index flat" in r.stderr
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx", "--index", "flat")
    assert r.returncode == 0 and "indexed 5 items" in r.stdout
