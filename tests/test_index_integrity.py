"""Index files that check themselves (issue 11, part 4): damaged or foreign files are found on
open and rebuilt or refused with one line; one writer at a time; readers write nothing;
background checkpoints; compaction. Real FAISS files and SQLite databases, damaged on disk."""
import json
import os
import shutil
import stat
import time

import httpx
import numpy as np
import pytest

from conftest import cli_in_process, run_cli, write_jsonl
from umr.index import IndexStore
from umr.index.documents import DocRecord
from umr.index.errors import IndexError_, ReaderBehind
from umr.index.locks import IndexBusy
from umr.index.verify import verify
from umr.index.search_plan import SearchPlan

DIM = 16


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def encoder_record():
    return {"spec": "test-vectors", "fingerprint": "f" * 16, "dim": DIM, "config": {}}


def make(path, n=300, seed=0, kind="flat"):
    store = IndexStore.create(path, encoder_record(), kind)
    vecs = unit(np.random.default_rng(seed), n)
    store.add([DocRecord(f"d{i}", "text", text=f"doc {i}") for i in range(n)], vecs)
    store.finalize()
    return store, vecs


def top1_is_itself(store, vecs, ids=range(0, 300, 37)) -> bool:
    hits = store.search(SearchPlan(vecs[list(ids)], k=1))
    return all(h[0].id == f"d{i}" and abs(h[0].score - 1.0) < 1e-4 for i, h in zip(ids, hits))


def vector_file_of(idx, seg=0):
    """The segment's vector file (index/vector_file.py): one per segment, named by its epoch."""
    found = sorted((idx / "segments" / str(seg)).glob("vectors.*"))
    assert len(found) == 1, found
    return found[0]


def checkpoint(idx, seg=0):
    """The FAISS file the manifest names for a segment (a new name per checkpoint)."""
    return idx / json.loads((idx / "manifest.json").read_text())["segments"][seg]["faiss_file"]


def test_random_bytes_in_a_faiss_file_are_found_and_rebuilt_from_the_document_store(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.close()
    size = checkpoint(idx).stat().st_size
    with open(checkpoint(idx), "r+b") as f:  # same size: only the checksum can tell
        f.seek(size // 2)
        f.write(os.urandom(4096))
    report = verify(idx)
    assert not report.ok and any("checksum" in p for p in report.problems)
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 1 and "checksum" in r.stdout
    before = checkpoint(idx).read_bytes()
    reader = IndexStore.open(idx, "read")  # a reader rebuilds it in memory and says it left the file alone
    assert any("in memory only, the file left as it is" in m for m in reader.repairs)
    assert top1_is_itself(reader, vecs)
    reader.close()
    assert checkpoint(idx).read_bytes() == before
    again = IndexStore.open(idx)  # a writer rebuilds it on open, with a message
    assert any("checksum" in m and "rebuilt" in m for m in again.repairs)
    assert top1_is_itself(again, vecs)
    again.save()
    again.close()
    assert verify(idx).ok
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok")


def test_truncated_and_foreign_faiss_files_are_rebuilt(tmp_path):
    idx, other = tmp_path / "idx", tmp_path / "other"
    store, vecs = make(idx)
    store.close()
    o, _ = make(other, n=400, seed=9)
    o.close()
    shutil.copy(checkpoint(other), checkpoint(idx))  # another index's checkpoint: more rows, other vectors
    again = IndexStore.open(idx)
    assert again.repairs and top1_is_itself(again, vecs)
    fresh = unit(np.random.default_rng(77), 1)
    again.add([DocRecord("fresh", "text", text="added after the repair")], fresh)
    assert again.search(SearchPlan(fresh, k=1))[0][0].id == "fresh"  # new documents are findable
    again.close()
    data = checkpoint(idx).read_bytes()
    checkpoint(idx).write_bytes(data[: len(data) // 3])
    r = cli_in_process("index", "verify", idx, "--repair")
    assert r.returncode == 0 and "repaired: segment 0" in r.stdout and "bytes" in r.stdout, r.stdout + r.stderr
    final = IndexStore.open(idx, "read")
    assert not final.repairs and final.count() == 301 and top1_is_itself(final, vecs)
    final.close()


def test_a_missing_foreign_or_damaged_document_store_is_refused_in_one_line(tmp_path):
    idx, other = tmp_path / "idx", tmp_path / "other"
    make(idx)[0].close()
    make(other, seed=3)[0].close()
    backup = tmp_path / "docs.backup"
    shutil.copy(idx / "docs.sqlite", backup)
    for suffix in ("", "-wal", "-shm"):
        if (idx / f"docs.sqlite{suffix}").exists():
            os.remove(idx / f"docs.sqlite{suffix}")
    with pytest.raises(IndexError_, match="docs.sqlite is missing"):
        IndexStore.open(idx)
    r = cli_in_process("index", "info", idx)
    assert r.returncode == 2 and "is missing" in r.stderr and "Traceback" not in r.stderr
    assert not (idx / "docs.sqlite").exists()  # refusing did not create an empty one
    shutil.copy(other / "docs.sqlite", idx / "docs.sqlite")
    with pytest.raises(IndexError_, match="belongs to another index"):
        IndexStore.open(idx)
    (idx / "docs.sqlite").write_bytes(b"not a database at all" * 100)
    r = cli_in_process("search", idx, "anything", "--encoder", "tiny-clip")
    assert r.returncode == 2 and "damaged" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    shutil.copy(backup, idx / "docs.sqlite")
    assert verify(idx).ok


def test_an_older_document_store_is_refused_unless_accepted_by_repair(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.close()
    shutil.copy(idx / "docs.sqlite", tmp_path / "old.sqlite")
    store = IndexStore.open(idx)
    store.add([DocRecord(f"n{i}", "text", text="later") for i in range(20)], unit(np.random.default_rng(1), 20))
    store.save()
    store.close()
    for suffix in ("-wal", "-shm"):
        if (idx / f"docs.sqlite{suffix}").exists():
            os.remove(idx / f"docs.sqlite{suffix}")
    shutil.copy(tmp_path / "old.sqlite", idx / "docs.sqlite")
    with pytest.raises(IndexError_, match="older than the rest of the index"):
        IndexStore.open(idx)
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 2 and "--repair" in r.stderr
    assert verify(idx, repair=True).ok
    again = IndexStore.open(idx, "read")
    assert again.count() == 300 and top1_is_itself(again, vecs)
    again.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_one_writer_at_a_time_readers_need_no_lock(tmp_path, tiny):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"text number {i}"} for i in range(30)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    writer = IndexStore.open(tmp_path / "idx")
    with pytest.raises(IndexBusy, match=f"pid {os.getpid()}") as busy:
        IndexStore.open(tmp_path / "idx")
    assert "read_only=True" in str(busy.value) and "umr serve --read-only" in str(busy.value)
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "m1", "text": "more"}])
    r = run_cli("index", "add", tmp_path / "idx", more)
    assert r.returncode == 2 and "open for writing by pid" in r.stderr and "Traceback" not in r.stderr
    r = cli_in_process("search", tmp_path / "idx", "text number 3", "-k", "1")
    assert r.returncode == 0 and "t3" in r.stdout  # a reader beside the writer
    reader = IndexStore.open(tmp_path / "idx", "read")
    with pytest.raises(IndexError_, match="read-only"):
        reader.add([DocRecord("x", "text", text="x")], np.zeros((1, writer.segments[0].dim), np.float32))
    reader.close()
    writer.close()
    assert cli_in_process("index", "add", tmp_path / "idx", more).returncode == 0  # the lock went with its holder


def test_every_file_of_an_index_has_the_same_permissions(tmp_path):
    make(tmp_path / "idx")[0].close()
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "idx").rglob("*") if p.is_file()}
    faiss = checkpoint(tmp_path / "idx").relative_to(tmp_path).as_posix()
    assert "idx/manifest.json" in modes and faiss in modes and "idx/docs.sqlite" in modes
    assert len(set(modes.values())) == 1, modes


def test_serving_writes_nothing_it_only_reads_and_checkpoints_in_the_background(tmp_path, tiny):
    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.server.settings import ServerSettings
    from umr.demo import BackgroundServer

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"text number {i}"} for i in range(30)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    files = lambda: {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "idx").rglob("*")  # noqa: E731
                     if p.is_file() and "docs.sqlite" not in p.name and not p.name.endswith(".lock")}
    before = files()
    engine = Engine.open(tmp_path / "idx")
    with BackgroundServer(create_app(engine, ServerSettings(checkpoint_every_rows=5, checkpoint_every_s=0))) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        for q in ("text number 3", "text number 7"):
            assert c.post("/v1/search", json={"text": q, "k": 2}).status_code == 200
        assert files() == before  # searching wrote nothing
        docs = [{"id": f"new{i}", "text": f"new text {i}"} for i in range(6)]
        assert c.post("/v1/documents", json={"documents": docs}).status_code == 200
        deadline = time.time() + 20
        while time.time() < deadline and srv.server.config.app.state.checkpointer.done == 0:
            time.sleep(0.1)
        assert srv.server.config.app.state.checkpointer.done >= 1
        manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
        assert manifest["segments"][0]["checkpoint"]["rows"] == 36
    engine.close()
    engine = Engine.open(tmp_path / "idx", mode="read")
    assert engine.store.segments[0].faiss.ntotal == 36 and not engine.store.segments[0].dirty  # nothing to replay
    engine.close()
    after = files()
    engine = Engine.open(tmp_path / "idx")
    with BackgroundServer(create_app(engine)):
        pass
    engine.close()
    assert files() == after  # a server that only started and stopped wrote nothing


def test_compaction_drops_dead_rows_and_survives_a_crash_midway(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    replaced = unit(np.random.default_rng(4), 50)
    store.add([DocRecord(f"d{i}", "text", text=f"doc {i} again") for i in range(50)], replaced)  # 50 dead rows
    store.delete([f"d{i}" for i in range(250, 260)])
    store.save()
    expected = [[h.id for h in hs] for hs in store.search(SearchPlan(vecs[100:140], k=5))]
    assert store.info()["segments"][0]["deleted_rows"] == 60
    store.close()
    r = cli_in_process("index", "compact", idx)
    assert r.returncode == 0 and "dropped 60 dead rows" in r.stdout
    store = IndexStore.open(idx, "read")
    assert store.info()["segments"][0]["deleted_rows"] == 0 and store.count() == 290
    assert [[h.id for h in hs] for hs in store.search(SearchPlan(vecs[100:140], k=5))] == expected
    assert store.search(SearchPlan(replaced[:1], k=1))[0][0].id == "d0"
    store.close()
    assert verify(idx).ok
    # A crash after the document store was compacted but before the FAISS checkpoint was saved.
    store = IndexStore.open(idx)
    store.delete(["d120"])
    store.docs.compact(0)
    store.close()
    again = IndexStore.open(idx)
    assert any("compacted after its FAISS checkpoint" in m for m in again.repairs)
    assert again.search(SearchPlan(vecs[121:122], k=1))[0][0].id == "d121" and again.count() == 289
    again.close()


def test_a_compaction_killed_after_its_transaction_keeps_its_checkpoint(tmp_path, monkeypatch):
    """The compacted FAISS file is written before the renumbering commits, and recorded by that
    transaction; killed before the manifest names it, the next open takes it, rebuilding nothing."""
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.delete([f"d{i}" for i in range(0, 300, 5)])
    store.save()

    def killed(self):
        raise OSError("killed before the manifest was written")

    monkeypatch.setattr(IndexStore, "save", killed)
    with pytest.raises(OSError):
        store.compact()
    monkeypatch.undo()
    store.close()
    again = IndexStore.open(idx)
    assert not again.repairs and again.count() == 240
    assert again.info()["segments"][0]["deleted_rows"] == 0
    assert top1_is_itself(again, vecs, ids=[1, 2, 3, 4, 6, 299])
    again.save()
    again.close()
    assert verify(idx).ok and len(list((idx / "segments" / "0").glob("index*.faiss"))) == 1


def test_a_crash_between_a_checkpoint_and_its_manifest_leaves_the_recorded_one_sound(tmp_path, monkeypatch):
    """The new FAISS file is written under a new name; the manifest written after it names it.
    Killed in between, the manifest still names the previous file, which is still there."""
    from umr.index import manifest as manifest_module

    idx = tmp_path / "idx"
    store, vecs = make(idx)
    before = checkpoint(idx)
    store.add([DocRecord("late", "text", text="late")], unit(np.random.default_rng(8), 1))

    def crash(*_):
        raise OSError("killed before the manifest was written")

    monkeypatch.setattr("umr.index.store.write_manifest", crash)
    with pytest.raises(OSError):
        store.save()
    monkeypatch.setattr("umr.index.store.write_manifest", manifest_module.write_manifest)
    store.close()
    assert checkpoint(idx) == before and before.exists()
    assert len(list((idx / "segments" / "0").glob("index*.faiss"))) == 2  # the unrecorded one
    again = IndexStore.open(idx)
    assert not again.repairs and again.count() == 301 and top1_is_itself(again, vecs)
    assert list((idx / "segments" / "0").glob("index*.faiss")) == [before]  # the writer cleared it
    again.save()
    again.close()
    assert checkpoint(idx) != before and not before.exists() and verify(idx).ok


def test_an_ivfpq_segment_compacts_and_repairs_too(tmp_path):
    idx = tmp_path / "idx"
    store = IndexStore.create(idx, encoder_record(), "ivfpq")
    vecs = unit(np.random.default_rng(0), 10_000)
    store.add([DocRecord(f"d{i}", "text", text=f"doc {i}") for i in range(10_000)], vecs)
    store.finalize()
    store.delete([f"d{i}" for i in range(0, 10_000, 3)])
    assert store.compact() == {0: 3334}
    kept = range(1, 600, 3)  # none of them deleted
    hits = store.search(SearchPlan(vecs[list(kept)], k=1))
    assert np.mean([h[0].id == f"d{i}" for i, h in zip(kept, hits)]) > 0.9
    assert all(int(h[0].id[1:]) % 3 for h in hits)  # no deleted document comes back
    store.close()
    assert verify(idx).ok


def test_a_reader_behind_a_compaction_refuses_rather_than_name_another_document(tmp_path):
    """A compaction renumbers a segment's rows; a read-only process holds the old numbering until
    it reopens. Its searches in between named whatever document now had the row number (d4's own
    vector answered "d7", score 1.0); now they refuse, filtered or not, and once reopened answer right."""
    idx = tmp_path / "idx"
    store = IndexStore.create(idx, encoder_record(), "flat")
    vecs = unit(np.random.default_rng(0), 300)
    store.add([DocRecord(f"d{i}", "text", text=f"doc {i}", metadata={"group": i % 2}) for i in range(300)], vecs)
    store.finalize()
    store.delete([f"d{i}" for i in range(0, 300, 3)])
    reader = IndexStore.open(idx, "read")
    assert [h[0].id for h in reader.search(SearchPlan(vecs[[4, 200]], k=1))] == ["d4", "d200"]
    assert store.compact() == {0: 100}
    for plan in (SearchPlan(vecs[[4, 5, 200]], k=1), SearchPlan(vecs[[4]], k=3, flt={"group": 0})):
        with pytest.raises(ReaderBehind, match="segment 0 .* compacted .* open the index again"):
            reader.search(plan)
    assert reader.follow().reopen == "segment 0 was compacted"
    reader.close()
    # The writer's own numbering moved with its compaction; a reopened reader's did too.
    for searcher in (store, again := IndexStore.open(idx, "read")):
        assert [h[0].id for h in searcher.search(SearchPlan(vecs[[4, 5, 200]], k=1))] == ["d4", "d5", "d200"]
        assert [h.id for h in searcher.search(SearchPlan(vecs[[4]], k=3, flt={"group": 0}))[0]][0] == "d4"
        assert all(int(h.id[1:]) % 2 == 0 for h in searcher.search(SearchPlan(vecs[[4]], k=3, flt={"group": 0}))[0])
    again.close()
    store.close()


def test_calibration_pairs_read_behind_a_compaction_are_refused_not_mismatched(tmp_path, tiny):
    """`umr update --no-activate` beside a writer pairs each document's stored vector with its
    new embedding, finding rows by id in the store's current numbering: behind a compaction
    those rows named other documents' vectors in the reader's file. Same encoder here, so
    every true pair has cosine 1."""
    from umr.retrieval.update.calibration_pairs import corpus_pairs

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"note {i} about topic {i}"} for i in range(40)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    writer = IndexStore.open(tmp_path / "idx")
    writer.delete([f"t{i}" for i in range(0, 40, 3)])
    reader = IndexStore.open(tmp_path / "idx", "read")
    writer.compact()
    with pytest.raises(ReaderBehind):
        corpus_pairs(reader, reader.segments[0], tiny, per_modality=20)
    reader.close()
    again = IndexStore.open(tmp_path / "idx", "read")
    (new, old), = corpus_pairs(again, again.segments[0], tiny, per_modality=20)[0].values()
    assert len(new) == 20 and np.allclose(np.sum(new * old, axis=1), 1.0, atol=1e-4)
    again.close()
    writer.close()


def test_a_read_only_server_reopens_an_index_compacted_under_it_before_answering(tmp_path, tiny):
    """Over HTTP, with the follower not polling (--follow-interval 0): searches sent at once,
    side by side, right after the writer compacted get the right documents, from one reopen;
    while the index cannot be opened, they are refused (503), never answered from the old numbering."""
    from concurrent.futures import ThreadPoolExecutor

    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.server.settings import ServerSettings
    from umr.demo import BackgroundServer

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"note {i} about topic {i}"} for i in range(40)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    writer = Engine.open(tmp_path / "idx")
    reader = Engine.open(tmp_path / "idx", mode="read")
    wanted = [f"t{i}" for i in range(1, 40, 3)]
    texts = [f"note {i[1:]} about topic {i[1:]}" for i in wanted]
    with BackgroundServer(create_app(reader, ServerSettings(follow_every_s=0))) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        top1 = lambda text: c.post("/v1/search", json={"text": text, "k": 1})  # noqa: E731
        before = [r.json()["results"][0]["id"] for r in map(top1, texts)]
        assert before == wanted
        writer.store.delete([f"t{i}" for i in range(0, 40, 3)])
        assert writer.store.compact() == {0: 14}
        manifest = tmp_path / "idx" / "manifest.json"
        manifest.rename(tmp_path / "away.json")  # what a reopen meets: no index there for now
        refused = top1(texts[0])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "index_reopening", refused.text
        assert "compacted by its writer" in refused.json()["error"]["message"]
        (tmp_path / "away.json").rename(manifest)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(top1, texts))
        assert [r.status_code for r in answers] == [200] * len(texts), [r.text for r in answers]
        assert [r.json()["results"][0]["id"] for r in answers] == wanted
        follows = c.get("/v1/index").json()["serving"]["follows"]
        assert follows["reopens"] == 1, follows
        batch = c.post("/v1/search/batch", json={"queries": [{"text": t, "k": 1} for t in texts[:3]]}).json()
        assert [r[0]["id"] for r in batch["results"]] == wanted[:3]
        reopened = srv.server.config.app.state.umr.engine
    assert reopened is not reader
    for engine in (reopened, reader, writer):
        engine.close()


def test_a_read_only_server_beside_the_writer_answers_searches_and_refuses_writes(tmp_path, tiny):
    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.demo import BackgroundServer

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"t{i}", "text": f"text number {i}"} for i in range(30)])
    assert cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx").returncode == 0
    writer = Engine.open(tmp_path / "idx")
    reader = Engine.open(tmp_path / "idx", mode="read")
    with BackgroundServer(create_app(reader)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/search", json={"text": "text number 4", "k": 1}).json()["results"][0]["id"] == "t4"
        r = c.post("/v1/documents", json={"documents": [{"id": "x", "text": "x"}]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "read_only"
        assert c.delete("/v1/documents/t4").status_code == 403
    reader.close()
    assert writer.store.count() == 30
    writer.close()


def test_a_damaged_manifest_or_commit_mark_is_named_not_guessed_around(tmp_path):
    """The last two kinds of file index/layout.py names: a manifest that is not JSON (cut short
    mid-write by a tool that did not write it atomically) is refused in one line by every
    command and by verify, and nothing is written; a commit mark that cannot be read proves
    nothing either way, so the index opens and verify passes (the mark is rewritten by the next
    write)."""
    from umr.index import commit_mark, layout

    idx = tmp_path / "idx"
    store, vecs = make(idx)
    store.close()
    manifest = (idx / layout.MANIFEST).read_bytes()
    (idx / layout.MANIFEST).write_bytes(manifest[: len(manifest) // 2])
    with pytest.raises(IndexError_, match="manifest.json is not valid JSON"):
        IndexStore.open(idx, "read")
    report = verify(idx)
    assert not report.ok and "not valid JSON" in report.fatal
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (idx / layout.MANIFEST).read_bytes() == manifest[: len(manifest) // 2]  # refusing wrote nothing
    (idx / layout.MANIFEST).write_bytes(manifest)

    mark = commit_mark.path_beside(idx / layout.DOCSTORE)
    assert mark.exists()
    mark.write_bytes(b"\x00garbage")
    store = IndexStore.open(idx)
    assert top1_is_itself(store, vecs) and not store.repairs
    store.add([DocRecord("new", "text", text="new")], vecs[:1])
    store.close()
    assert commit_mark.read(idx / layout.DOCSTORE) is not None  # a write wrote it whole again
    assert verify(idx).ok
