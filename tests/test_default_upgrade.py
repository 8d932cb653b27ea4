"""The default encoder moved on (lit-base v1 -> v2): indexes built with v1 keep working, and
`umr update --encoder lit-base` moves them to v2 without re-embedding a document."""
import json

import numpy as np
import pytest

from conftest import FLICKR, ROOT, cli_in_process, write_jsonl
from umr.index import IndexStore
from umr.retrieval.encoders import load_encoder
from umr.retrieval.engine import Engine, Query
from umr.retrieval.items import Item
from umr.retrieval.indexing.pipeline import build_index

pytestmark = pytest.mark.slow


def _captions(photos: set[str]) -> dict[str, list[str]]:
    import csv

    out: dict[str, list[str]] = {}
    with open(FLICKR / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            if row["image"] in photos:
                out.setdefault(row["image"], []).append(row["caption"])
    return out


def _hit_rate(engine: Engine, queries: list[tuple[str, str]], k: int = 5) -> float:
    hits = engine.search([Query(text) for text, _ in queries], k=k)
    return float(np.mean([any(h.id == photo for h in hs) for hs, (_, photo) in zip(hits, queries)]))


def _as_built_by_the_old_default(idx) -> None:
    """Before v2 shipped, an index built with `--encoder lit-base` recorded the bare name with
    v1's fingerprint; pinned names did not exist yet."""
    path = idx / "manifest.json"
    manifest = json.loads(path.read_text())
    for record in [manifest["encoder"], *manifest["encoders"], *(s["encoder"] for s in manifest["segments"])]:
        record["spec"] = "lit-base"
    path.write_text(json.dumps(manifest))


def test_an_index_of_the_old_default_still_searches_and_upgrades_without_reindexing(tmp_path):
    split = json.loads((FLICKR / "split.json").read_text())
    photos = split["test"][:40]
    corpus = write_jsonl(tmp_path / "photos.jsonl",
                         [{"id": p, "image": str(FLICKR / "images" / p)} for p in photos])
    v1 = load_encoder("lit-base@1")
    build_index(corpus, v1, tmp_path / "idx", progress=False)
    _as_built_by_the_old_default(tmp_path / "idx")
    queries = [(caps[0], p) for p, caps in _captions(set(photos)).items()]

    engine = Engine.open(tmp_path / "idx")  # the bare name now means v2; the fingerprint picks v1
    assert engine.encoder.fingerprint == v1.fingerprint != load_encoder("lit-base").fingerprint
    before = _hit_rate(engine, queries)
    engine.close()
    assert before >= 0.6, before

    store = IndexStore.open(tmp_path / "idx")
    stored = store.docs.vectors_at(0, np.arange(40))
    store.close()
    # No calibration flags: a photo-only index has no texts of its own, so text queries are
    # calibrated with umr's generic queries, and image+text ones with its photos paired with them.
    r = cli_in_process("update", tmp_path / "idx", "--encoder", "lit-base", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["active_version"] == 2
    modalities = report["segments"][0]["modalities"]
    assert modalities["text"]["status"] == "ok" and modalities["text"]["sources"] == ["generic"]
    assert modalities["image"]["sources"] == ["corpus"] and modalities["image,text"]["sources"] == ["images paired with generic queries"]
    assert report["calibration"] == ["corpus", "generic", "images paired with generic queries"]
    assert report["calibration_requested"] == ["corpus", "passages"]

    engine = Engine.open(tmp_path / "idx")
    assert engine.version == 2 and engine.encoder.fingerprint == load_encoder("lit-base").fingerprint
    after = _hit_rate(engine, queries)
    assert after >= before - 0.1, (before, after)  # old photos stay findable through the compensator
    info = engine.info()
    assert info["segments"][0]["documents"] == 40 and info["segments"][0]["encoder_version"] == 1
    assert np.array_equal(stored, engine.store.docs.vectors_at(0, np.arange(40)))  # nothing was re-embedded
    # New documents are embedded by v2, which knows ImageNet's concepts: the sample's cat is found.
    engine.add([Item("cat", None, str(ROOT / "umr" / "sample" / "cat.jpg"))])
    assert [s["encoder_version"] for s in engine.info()["segments"]] == [1, 2]
    assert engine.search([Query("a cat")], k=1)[0][0].id == "cat"
    engine.close()
