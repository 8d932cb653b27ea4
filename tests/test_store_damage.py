"""Damage that used to be served as if whole (issue 23, part 2): a damaged docs.sqlite, writes
that only the lost WAL held, FAISS contents replaced together with their manifest record, and
stored vectors that are not their documents' encodings. Real SQLite and FAISS files, damaged
on disk; the CLI as a user runs it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, cli_in_process, write_jsonl
from umr.index import IndexStore, integrity
from umr.index import vector_index as vi
from umr.index.errors import IndexDamaged, IndexError_
from umr.index.verify import verify
from test_index_integrity import checkpoint, make, top1_is_itself, unit, vector_file_of


def overwrite_stored_vector(idx, seg: int, row: int, change) -> None:
    """Change one row of a segment's vector file in place, as a disk or another tool would:
    `change(bytearray of the row)`."""
    path = vector_file_of(idx, seg)
    dim = json.loads((idx / "manifest.json").read_text())["segments"][seg]["encoder"]["dim"]
    size = dim * 4
    with open(path, "r+b") as f:
        f.seek(row * size)
        blob = bytearray(f.read(size))
        change(blob)
        f.seek(row * size)
        f.write(bytes(blob))


def damage_an_index_page(idx, index_name="sqlite_autoindex_docs_2"):
    """Bytes of one leaf page of an SQLite index overwritten: the table reads fine, the index
    does not (as 64 bytes flipped by a disk did: 595 documents served of 1,200)."""
    path = idx / "docs.sqlite"
    db = sqlite3.connect(path)
    page = db.execute("SELECT pageno FROM dbstat WHERE name=? AND pagetype='leaf' ORDER BY pageno LIMIT 1",
                      (index_name,)).fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size + size // 2)
        f.write(bytes(range(64)))


def test_a_damaged_document_store_is_refused_and_repair_says_it_cannot_mend_it(tmp_path):
    idx = tmp_path / "idx"
    make(idx, n=1200)[0].close()
    damage_an_index_page(idx)
    for mode in ("write", "read"):
        with pytest.raises(IndexDamaged, match="restore it from a backup"):
            IndexStore.open(idx, mode)
    r = cli_in_process("search", idx, "anything")  # refused before any encoder is loaded
    assert r.returncode == 2 and "is damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 1 and "problem: docs.sqlite" in r.stdout and "cannot repair: docs.sqlite is damaged" in r.stdout
    r = cli_in_process("index", "verify", idx, "--repair")
    assert r.returncode == 1 and "restore docs.sqlite from a backup" in r.stdout and "--repair` rebuilds" not in r.stdout


def test_a_reader_reopening_checks_its_document_store_again_only_where_it_is_another_file(tmp_path, caplog):
    """A read-only server reopens after each compaction of its writer: the file it checked at
    open and held open since is not checked again (14 s at 10M documents); a file put in its
    place is, and a damaged one is refused."""
    idx = tmp_path / "idx"
    make(idx, n=1200)[0].close()
    caplog.set_level(logging.INFO, logger="umr.index")
    first = IndexStore.open(idx, "read")
    assert first.docs.checked and first.docs.checked_file == integrity.file_identity(idx / "docs.sqlite")
    assert sum("passed SQLite's integrity check" in r.message for r in caplog.records) == 1
    caplog.clear()
    again = IndexStore.open(idx, "read", checked_file=first.docs.checked_file)
    assert again.docs.checked and again.count() == 1200
    assert not any("integrity check" in r.message for r in caplog.records)
    again.close()

    shutil.copy(idx / "docs.sqlite", idx / "docs.copy")
    os.replace(idx / "docs.copy", idx / "docs.sqlite")  # the same bytes, another file
    damage_an_index_page(idx)
    with pytest.raises(IndexDamaged, match="restore it from a backup"):
        IndexStore.open(idx, "read", checked_file=first.docs.checked_file)
    first.close()


def test_a_large_store_is_checked_while_serving_and_a_damaged_one_answers_503(tmp_path, tiny, monkeypatch):
    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.demo import BackgroundServer

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"text number {i}"} for i in range(300)])
    from umr.retrieval.indexing.pipeline import build_index

    build_index(corpus, tiny, tmp_path / "idx", progress=False)
    damage_an_index_page(tmp_path / "idx", "sqlite_autoindex_docs_1")
    monkeypatch.setattr(integrity, "OPEN_CHECK_MAX_BYTES", 0)  # as if the store were over 2 GB
    engine = Engine.open(tmp_path / "idx", tiny, mode="read")
    assert not engine.store.docs.checked
    with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        deadline = time.monotonic() + 20
        while c.get("/healthz").status_code == 200:
            assert time.monotonic() < deadline, "the background check never refused the damaged store"
            time.sleep(0.1)
        r = c.post("/v1/search", json={"text": "text number 3"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "index_damaged"
        assert c.get("/healthz").json()["error"]["code"] == "index_damaged"
    engine.close()


WRITER = """
import sys, time
import numpy as np
from umr.index import IndexStore
from umr.index.documents import DocRecord
store = IndexStore.open(sys.argv[1])
store.save()  # a checkpoint: FAISS and docs.sqlite hold the first 300
for i in range(40):  # acknowledged one by one; they live in the WAL only
    store.add([DocRecord(f"late{i}", "text", text="later")], np.full((1, 16), 0.25, np.float32))
print("acknowledged", flush=True)
time.sleep(120)
"""


def test_writes_only_the_lost_wal_held_are_found_missing_not_lost_silently(tmp_path):
    idx = tmp_path / "idx"
    make(idx)[0].close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(idx)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "acknowledged"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.remove(idx / "docs.sqlite-wal")
    with pytest.raises(IndexError_, match="writes but this index acknowledged") as e:
        IndexStore.open(idx, "read")
    assert "docs.sqlite-wal" in str(e.value) and "the last 40 writes" in str(e.value)
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 2 and "--repair" in r.stderr
    report = verify(idx, repair=True)
    assert report.ok and any("last 40 writes are gone" in m for m in report.repaired)
    store = IndexStore.open(idx, "read")
    assert store.count() == 300
    store.close()


def test_a_checkpoint_puts_the_wal_into_the_store(tmp_path):
    """What a background checkpoint leaves: docs.sqlite alone holds every acknowledged write."""
    idx = tmp_path / "idx"
    store, _ = make(idx)
    store.add([integrity_doc(i) for i in range(25)], unit(np.random.default_rng(5), 25))
    store.save()
    copy = tmp_path / "alone.sqlite"
    shutil.copy(idx / "docs.sqlite", copy)  # the file without its WAL, as a careless backup takes it
    store.close()
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM docs").fetchone()[0] == 325


def integrity_doc(i):
    from umr.index.documents import DocRecord

    return DocRecord(f"n{i}", "text", text=f"new {i}")


def test_faiss_holding_other_vectors_behind_a_matching_record_is_found_and_repaired(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.close()
    manifest = json.loads((idx / "manifest.json").read_text())
    seg = manifest["segments"][0]
    other = vi.new_index(vi.IndexChoice.from_dict(seg["index"]), 16)
    other.add(unit(np.random.default_rng(7), 300))
    vi.write_index(other, str(checkpoint(idx)))
    seg["checkpoint"] = integrity.checkpoint_record(checkpoint(idx), 300, seg["checkpoint"]["epoch"])
    (idx / "manifest.json").write_text(json.dumps(manifest))  # the record matches the tampered file
    r = cli_in_process("index", "verify", idx, "--full")
    assert r.returncode == 1 and "300 of 300 rows compared differ between FAISS and the stored vectors" in r.stdout
    assert cli_in_process("index", "verify", idx, "--repair").returncode == 0
    again = IndexStore.open(idx, "read")
    assert top1_is_itself(again, vecs)
    again.close()
    assert cli_in_process("index", "verify", idx, "--full").returncode == 0


def test_reencode_finds_a_stored_vector_that_is_not_its_documents_encoding(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"a note about topic {i}"} for i in range(60)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    db = sqlite3.connect(tmp_path / "idx" / "docs.sqlite")
    seg, row = db.execute("SELECT segment, row FROM docs WHERE id='t17'").fetchone()
    db.close()
    # another document's direction: what a race between two encodings stored
    overwrite_stored_vector(tmp_path / "idx", seg, row, lambda blob: blob.__setitem__(slice(None), _unit(len(blob) // 4)))
    assert cli_in_process("index", "verify", tmp_path / "idx", "--repair").returncode == 0  # FAISS follows the store
    r = cli_in_process("index", "verify", tmp_path / "idx", "--reencode", "60")
    assert r.returncode == 1 and "document 't17'" in r.stdout and "fresh encoding" in r.stdout
    assert "--reencode N --repair` replaces them" in r.stdout and r.stdout.count("problem:") == 1
    r = cli_in_process("index", "verify", tmp_path / "idx", "--reencode", "60", "--repair")
    assert r.returncode == 0 and "repaired: document 't17'" in r.stdout and "replaced by the fresh one" in r.stdout
    assert cli_in_process("index", "verify", tmp_path / "idx", "--reencode", "60", "--full").returncode == 0
    from umr.retrieval.engine import Engine, Query

    engine = Engine.open(tmp_path / "idx", mode="read")
    assert engine.search([Query("a note about topic 17")], k=1)[0][0].id == "t17"
    engine.close()


def _unit(dim: int) -> bytes:
    v = np.random.default_rng(3).normal(size=dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tobytes()


def test_damaged_stored_vectors_are_restored_from_the_checkpoint_not_copied_into_it(tmp_path):
    """A repair that rebuilt FAISS from a damaged store made answers worse (bench/damage.py: 2 of
    20 queries kept their answers): stored vectors that are not unit vectors are the damaged
    side, and a flat checkpoint holds them exactly."""
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.close()
    for row in (37, 74):  # an exponent bit of the first float: what a flipped bit on disk does
        overwrite_stored_vector(idx, 0, row, lambda blob: blob.__setitem__(3, blob[3] ^ 0x40))
    db = sqlite3.connect(idx / "docs.sqlite")
    with db:
        db.execute("UPDATE docs SET metadata='{not json' WHERE id='d5'")
    db.close()
    r = cli_in_process("index", "verify", idx, "--full")
    assert r.returncode == 1 and "2 stored vectors are damaged" in r.stdout and "--repair restores them" in r.stdout
    assert "document 'd5' (segment 0) cannot be read back" in r.stdout
    r = cli_in_process("index", "verify", idx, "--repair", "--full")
    assert "repaired: segment 0: 2 stored vectors are damaged" in r.stdout and "restored from the FAISS checkpoint" in r.stdout
    assert r.returncode == 1 and "cannot repair: document 'd5' cannot be read back" in r.stdout
    again = IndexStore.open(idx, "read")
    assert top1_is_itself(again, vecs, ids=[37, 74, 111])
    assert np.allclose(again.docs.vectors_at(0, np.array([37, 74])), vecs[[37, 74]])
    again.close()
