"""`import umr`: the Python API over the engine, and the README's example run as written."""
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, write_jsonl


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs_and_prints_what_it_says():
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "26 documents"
    assert lines[1].split()[1:] == ["coffee", "coffee.jpg"]  # the coffee photo first
    assert lines[4:] == ["note-1", "['note-1']", "cat", "(2, 384)"]


@pytest.fixture()
def corpus(tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    records = [{"id": f"t{i}", "text": f"document number {i} about topic {i % 3}",
                "metadata": {"year": 2000 + i % 4, "draft": i % 2 == 0, "name": str(2000 + i % 4)}} for i in range(30)]
    records.append({"id": "photo/red", "image": "red.png", "text": "a red square"})
    return write_jsonl(tmp_path / "c.jsonl", records)


def test_build_search_add_delete_typed(tmp_path, corpus):
    import umr

    with umr.Index.build(corpus, encoder="tiny-clip", out=tmp_path / "idx") as index:
        assert len(index) == 31 and index.encoder.spec == "tiny-clip"
        hits = index.search(text="document number 7 about topic 1", k=5)
        assert len(hits) == 5 and all(isinstance(h, umr.Hit) for h in hits)
        assert hits == sorted(hits, key=lambda h: -h.score)
        vec = index.encoder.encode(texts=["document number 7 about topic 1"])
        direct = index.engine.search_vectors(vec, 5, query_modalities=["text"])[0]
        assert [h.id for h in hits] == [h.id for h in direct]  # the same engine, the same ranking
        # Filters are typed: the number 2001 and the string "2001" select different metadata.
        by_number = index.search(text="document", k=50, filter={"year": 2001})
        assert by_number and {h.metadata["year"] for h in by_number} == {2001}
        assert {h.id for h in index.search(text="document", k=50, filter={"name": "2001"})} == {h.id for h in by_number}
        assert index.search(text="document", k=50, filter={"year": "2001"}) == []
        assert {h.metadata["draft"] for h in index.search(text="document", k=50, filter={"draft": True})} == {True}
        red = index.search(image=tmp_path / "red.png", k=1, modality="image,text")[0]
        assert red.id == "photo/red" and red.image == (tmp_path / "red.png").resolve() and red.text == "a red square"
        assert index.search(text="document", k=50, modality="text")[0].modality == "text"

        png = (tmp_path / "red.png").read_bytes()
        assert index.add([{"id": "new", "text": "a brand new note", "metadata": {"year": 1999}},
                          {"id": "upload", "image": png}]) == ["new", "upload"]
        assert len(index) == 33
        stored = index.get("upload")
        assert stored.modality == "image" and stored.image.read_bytes() == png and stored.image.is_relative_to(index.path)
        assert index.search(text="note", k=5, filter={"year": 1999})[0].id == "new"
        assert index.delete(["new", "missing"]) == ["new"]
        with pytest.raises(KeyError, match="no document with id 'new'"):
            index.get("new")

        with pytest.raises(ValueError, match="unknown document field"):
            index.add([{"id": "x", "txt": "typo"}])
        with pytest.raises(ValueError, match="lone surrogate|not valid|Unicode"):
            index.add([{"id": "ok", "text": "fine"}, {"id": "bad", "text": "dog \ud800 cat"}])
        assert len(index) == 32  # all or nothing: "ok" was not stored either
        with pytest.raises(ValueError, match="k is a positive integer"):
            index.search(text="x", k=0)
        with pytest.raises(ValueError, match="text=, image="):
            index.search()
        assert "32 documents" in repr(index)

    with umr.Index.open(tmp_path / "idx", read_only=True) as ro:  # the write lock was released
        assert len(ro) == 32 and ro.search(text="a brand new note", k=3)
        from umr.index.errors import IndexError_

        with pytest.raises(IndexError_, match="read-only"):
            ro.add([{"id": "y", "text": "refused"}])
        assert len(ro) == 32


def test_update_swaps_the_encoder_without_reindexing(tmp_path, corpus):
    import umr

    with umr.Index.build(corpus, encoder="tiny-clip", out=tmp_path / "idx") as index:
        stored = index.engine.store.docs.vectors_at(0, np.arange(31)).copy()
        report = index.update(umr.load_encoder("tiny-clip:1"), calibration=["corpus"], force=True)
        assert report["version"] == 2 and report["active_version"] == 2
        assert index.engine.version == 2 and index.encoder.spec == "tiny-clip:1"
        # Nothing re-embedded, nothing lost: the stored vectors are the old encoder's, bit for bit,
        # and queries of the new one reach them through the compensator registered for version 2.
        np.testing.assert_array_equal(index.engine.store.docs.vectors_at(0, np.arange(31)), stored)
        info = index.info()
        assert [v["version"] for v in info["encoders"]] == [1, 2]
        seg = info["segments"][0]
        assert seg["encoder_version"] == 1 and "2" in seg["compensators"] and seg["documents"] == 31
        raw = index.encoder.encode(texts=["document number 3 about topic 0"])
        mapped = index.engine.map_queries(raw, ["text"])
        mapped = mapped[0] if isinstance(mapped, dict) else mapped
        assert not np.allclose(mapped, raw, atol=1e-3)  # the query was carried into the old space
        after = index.search(text="document number 3 about topic 0", k=3)
        assert len(after) == 3 and len(index) == 31
    with umr.Index.open(tmp_path / "idx") as again:  # the active encoder is what opens by default
        assert again.engine.version == 2


def test_load_encoder_encodes_unit_rows_in_both_roles():
    import umr

    enc = umr.load_encoder("tiny-clip")
    q = enc.encode(texts=["a", "b c"])
    d = enc.encode(texts=["a", "b c"], role="document")
    assert q.shape == (2, enc.dim) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(d, q, atol=1e-6)  # without an instruction the roles embed alike
    assert q[0] @ q[1] < 0.999  # different texts, different vectors
    red = Image.new("RGB", (32, 32), "red")
    fused = enc.encode(texts=["a red square"], images=[red])
    parts = enc.encode(texts=["a red square"])[0] + enc.encode(images=[red])[0]
    np.testing.assert_allclose(fused[0], parts / np.linalg.norm(parts), atol=1e-5)  # CLIP_SF fusion
    with pytest.raises(ValueError, match="paired row by row"):
        enc.encode(texts=["a"], images=[])
    with pytest.raises(ValueError, match="at least one"):
        enc.encode()


def test_import_umr_stays_light():
    """`import umr` (and so the CLI's start) loads neither torch nor the engine."""
    r = subprocess.run([sys.executable, "-c", "import sys, umr; print('torch' in sys.modules, 'retrieval' in sys.modules);"
                        " umr.Index; print('umr.retrieval.engine' in sys.modules)"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["False", "False", "True"], r.stderr
