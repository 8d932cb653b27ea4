"""`umr index build --vectors EMB.npy --ids IDS.jsonl`: indexes from precomputed embeddings."""
import json

import numpy as np
import pytest

from conftest import cli_in_process, run_cli, write_jsonl
from umr.index import IndexStore
from umr.retrieval.engine import Engine, Query
from umr.retrieval.indexing.build_steps import StrictError
from umr.retrieval.indexing.pipeline import build_index
from umr.retrieval.indexing.vector_import import build_from_vectors
from umr.index.search_plan import SearchPlan


def exported(index_dir):
    """(ids in row order, their vectors, their records) of a built index's segment 0."""
    store = IndexStore.open(index_dir, mode="read")
    try:
        docs = sorted(store.docs.iter_docs(), key=lambda d: store.docs.get(d.id)[2])
        rows = np.array([store.docs.get(d.id)[2] for d in docs])
        return docs, store.docs.vectors_at(0, rows)
    finally:
        store.close()


@pytest.mark.slow
def test_vectors_of_an_encoder_index_like_its_corpus(tmp_path, flickr_test, lit):
    """Captions embedded by lit-base, exported, and imported with --encoder lit-base: text queries
    through the encoder find what the index built from the captions themselves finds."""
    names, captions = flickr_test
    recs = [{"id": f"c{i}", "text": captions[n][0], "metadata": {"photo": n}} for i, n in enumerate(names[:150])]
    build_index(write_jsonl(tmp_path / "c.jsonl", recs), lit, tmp_path / "from-corpus", progress=False)
    docs, vectors = exported(tmp_path / "from-corpus")
    np.save(tmp_path / "emb.npy", vectors * 3.0)  # not unit rows: umr normalises them
    write_jsonl(tmp_path / "ids.jsonl", [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in docs])
    r = run_cli("index", "build", "--vectors", tmp_path / "emb.npy", "--ids", tmp_path / "ids.jsonl",
                "--encoder", "lit-base", "--out", tmp_path / "from-vectors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["indexed"] == 150
    a, b = Engine.open(tmp_path / "from-corpus", lit, mode="read"), Engine.open(tmp_path / "from-vectors", lit, mode="read")
    try:
        queries = [Query(captions[n][1]) for n in names[:150:15]]
        for x, y in zip(a.search(queries, 5), b.search(queries, 5)):
            assert [h.doc.id for h in x] == [h.doc.id for h in y]
            assert np.allclose([h.score for h in x], [h.score for h in y], atol=1e-5)
        hit = b.search([Query(captions[names[0]][0])], 1)[0][0]
        assert hit.doc.id == "c0" and hit.doc.modality == "text" and hit.doc.metadata == {"photo": names[0]}
    finally:
        a.close()
        b.close()


def test_import_rejects_bad_rows_and_resumes_after_a_stop(tmp_path, tiny):
    rng = np.random.default_rng(0)
    n, dim = 2000, tiny.dim
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[1607] = 0.0
    x[1611, 3] = np.nan
    np.save(tmp_path / "emb.npy", x)
    lines = [json.dumps(f"row{i}") for i in range(n)]
    lines[3] = json.dumps({"id": "row3", "text": "a caption", "metadata": {"year": 2020}})
    lines[12] = json.dumps({"id": "row12", "modality": "text"})
    lines[1500] = json.dumps({"id": "row1500", "modality": "video"})
    lines[1604] = json.dumps("row0")  # the id of row 0 again
    lines[1609] = "not json"
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(lines))  # no newline after the last line: it still counts
    out = tmp_path / "idx"
    # --strict stops at row 1500 (unknown modality), after committing the batches before it.
    with pytest.raises(StrictError, match="row1500"):
        build_from_vectors(tmp_path / "emb.npy", ids, tiny, out, batch_size=500, progress=False, strict=True)
    lines[1500] = json.dumps({"id": "row1500", "modality": "text"})
    ids.write_text("\n".join(lines))
    report = build_from_vectors(tmp_path / "emb.npy", ids, tiny, out, batch_size=500, progress=False)
    assert report.resumed_at == 1500
    assert {r["id"]: r["reason"] for r in report.rejections} == {
        "row0": "duplicate id in the corpus", "row1607": "vector is zero or not finite",
        "row1611": "vector is zero or not finite", "line 1610": "invalid JSON (Expecting value)"}
    assert report.indexed == n - 4
    store = IndexStore.open(out, mode="read")
    try:
        assert store.count() == n - 4
        assert store.get("row3").text == "a caption" and store.get("row3").metadata == {"year": 2020}
        assert store.get("row3").modality == "text" and store.get("row12").modality == "text"
        assert store.get("row1500").modality == "text" and store.get("row5").modality == "image"
        # Stored as unit rows; a row's own vector finds it first.
        _, seg, row = store.docs.get("row42")
        v = store.docs.vectors_at(seg, np.array([row]))[0]
        assert np.allclose(v, x[42] / np.linalg.norm(x[42]), atol=1e-6)
        assert store.search(SearchPlan(v[None], 1))[0][0].id == "row42"
    finally:
        store.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_import_errors_are_one_line(tmp_path):
    from umr.cli import build_parser
    from umr.cli.args import UserError
    from umr.cli.index_commands import cmd_index_build

    np.save(tmp_path / "emb.npy", np.ones((3, 8), dtype=np.float32))
    write_jsonl(tmp_path / "ids.jsonl", ["\"a\"", "\"b\""])
    # Flag combinations are refused before anything loads: checked in this process.
    for args, message in [
        (["--vectors", tmp_path / "emb.npy"], "--vectors and --ids go together"),
        ([tmp_path / "ids.jsonl", "--vectors", tmp_path / "emb.npy", "--ids", tmp_path / "ids.jsonl"], "give no corpus"),
        ([], "give a corpus to index"),
    ]:
        with pytest.raises(UserError, match=message):
            cmd_index_build(build_parser().parse_args(["index", "build", *map(str, args), "--out", str(tmp_path / "o")]))
    # The rest as a user meets them: one line on stderr, exit 2, no index written.
    np.save(tmp_path / "emb2.npy", np.ones((3, 64), dtype=np.float32))  # tiny-clip's dimension
    cases = [
        (["--vectors", tmp_path / "emb.npy"], "dimension 8; the encoder has dimension"),
        (["--vectors", tmp_path / "nowhere.npy"], "vectors not found"),
        (["--vectors", tmp_path / "emb2.npy"], "has 3 vectors but"),
    ]
    for args, message in cases:
        r = cli_in_process("index", "build", *args, "--ids", tmp_path / "ids.jsonl", "--encoder", "tiny-clip",
                           "--out", tmp_path / "out")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_python_api_builds_from_vectors(tmp_path):
    import umr

    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 64)).astype(np.float32)  # tiny-clip's dimension
    np.save(tmp_path / "emb.npy", x)
    write_jsonl(tmp_path / "ids.jsonl", [{"id": f"v{i}", "metadata": {"n": i}} for i in range(300)])
    index = umr.Index.from_vectors(tmp_path / "emb.npy", tmp_path / "ids.jsonl", encoder="tiny-clip", out=tmp_path / "idx")
    try:
        assert index.engine.store.count() == 300
        own = x[17] / np.linalg.norm(x[17])
        hit = index.engine.store.search(SearchPlan(own[None], 1))[0][0]
        assert hit.id == "v17" and hit.doc.metadata == {"n": 17} and hit.doc.modality == "image"
    finally:
        index.close()


def test_plain_id_lines_read_as_the_json_parser_reads_them(tmp_path):
    """Lines that are a bare JSON string skip the parser; every verdict matches the parser's."""
    from umr.retrieval.corpus.readers import Rejected
    from umr.retrieval.indexing.vector_import import plain_id, read_ids

    lines = ['"a"', '"b\\u0041"', '"c" x', '"d\x01"', '""', '"e/image"', '"f"  ', '{"id": "g", "metadata": {"k": 1}}',
             '"h\\"q"', '7', '"caf\u00e9"', ' "i"']
    (tmp_path / "ids.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = [(r, False, {}) if isinstance(r, str) else (r.id, isinstance(r, Rejected), getattr(r, "metadata", None))
           for r in read_ids(tmp_path / "ids.jsonl", "image")]
    assert got == [("a", False, {}), ("bA", False, {}), ("line 3", True, None), ("d\x01", True, None),
                   ("line 5", True, None), ("e/image", True, None), ("f", False, {}), ("g", False, {"k": 1}),
                   ('h"q', False, {}), ("7", False, {}), ("caf\u00e9", False, {}), ("i", False, {})]
    assert [plain_id(x) for x in ('"a"\n', '"b\\n"', '"c" x', '""', ' "i"')] == ["a", None, None, None, None]


def test_duplicates_across_batches_are_refused_without_a_set_of_every_id(tmp_path):
    """With batches of 2, a repeated id lands in a later batch than its first: the store, not a
    set of every id, finds it; the first record wins, as in one batch."""
    from umr.retrieval.encoders import load_encoder

    x = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ["a", "b", "c", "a", "d", "b", "a"]))
    r = build_from_vectors(tmp_path / "emb.npy", tmp_path / "ids.jsonl", load_encoder("lit-base@1"), tmp_path / "idx",
                           index_kind="flat", batch_size=2, progress=False)
    assert (r.indexed, r.rejected) == (4, 3)
    assert [x["id"] for x in r.rejections] == ["a", "b", "a"]
    docs, vectors = exported(tmp_path / "idx")
    assert [d.id for d in docs] == ["a", "b", "c", "d"]
    assert np.allclose(vectors[0], x[0] / np.linalg.norm(x[0]), atol=1e-6)  # the first "a"


def test_plain_ids_store_what_the_same_ids_as_records_store(tmp_path):
    """A batch of plain ids is stored whole (PlainDocs: no record per row); the same ids written
    as objects go row by row. Both indexes hold the same documents in the same rows, with the
    same modality and vectors; a batch with a bad vector or a repeated id goes row by row in both."""
    from umr.retrieval.encoders import load_encoder

    x = np.random.default_rng(2).standard_normal((1200, 256)).astype(np.float32)
    x[700] = 0.0
    ids = [f"d{i}" for i in range(1200)]
    ids[1100] = "d3"  # a repeat of an id a first batch stored
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ids))
    (tmp_path / "objects.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    got = {}
    for kind in ("plain", "objects"):
        report = build_from_vectors(tmp_path / "emb.npy", tmp_path / f"{kind}.jsonl", load_encoder("lit-base@1"),
                                    tmp_path / kind, modality="text", index_kind="flat", batch_size=500,
                                    progress=False, vector_dtype="float16")
        got[kind] = (report.indexed, sorted((r["id"], r["reason"]) for r in report.rejections), *exported(tmp_path / kind))
    (n, rejected, docs, vectors), (n2, rejected2, docs2, vectors2) = got["plain"], got["objects"]
    assert n == n2 == 1198 and rejected == rejected2 == [("d3", "duplicate id in the corpus"),
                                                         ("d700", "vector is zero or not finite")]
    assert [d.to_dict() for d in docs] == [d.to_dict() for d in docs2]
    assert {d.modality for d in docs} == {"text"} and docs[0].metadata == {}
    assert np.array_equal(vectors, vectors2)
    assert np.allclose(vectors[5], x[5] / np.linalg.norm(x[5]), atol=1e-3)  # float16
    store = IndexStore.open(tmp_path / "plain", mode="read")
    try:
        seg = store.segments[0]
        assert seg.codes.tolist() == [2] * 1198 and seg.alive.all()  # text, as stored in the rows table
        assert store.search(SearchPlan(vectors[600][None], 1))[0][0].id == docs[600].id
    finally:
        store.close()


def test_a_fresh_batch_with_a_stored_id_is_refused_whole(tmp_path):
    """`fresh` skips the lookup of ids already stored; the id's key still refuses a stored one,
    and nothing of that batch lands."""
    import sqlite3

    from umr.index.documents import DocRecord

    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = IndexStore.create(tmp_path / "idx", {"spec": "t", "fingerprint": "f", "dim": 256, "config": {}}, "flat", None)
    try:
        store.add([DocRecord("a", "image"), DocRecord("b", "image")], x[:2], fresh=True)
        with pytest.raises(sqlite3.IntegrityError):
            store.add([DocRecord("c", "image"), DocRecord("a", "image")], x[1:], fresh=True)
        store.add([DocRecord("a", "text", "replaced")], x[2:])  # not fresh: replaces
        assert store.count() == 2 and store.docs.get("c") is None
        assert store.docs.get("a")[0].text == "replaced"
    finally:
        store.close()
