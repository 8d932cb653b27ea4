"""Mixed corpora: scores calibrated across modalities, fitted on the index's own documents."""
import json

import numpy as np
import pytest

from conftest import FLICKR, flickr_captions, write_jsonl
from umr.index.modality_calibration import ModalityCalibration, fit_dense, table
from umr.retrieval.engine import Engine, Query
from umr.retrieval.indexing.pipeline import build_index


def test_calibration_is_monotone_per_pair_and_keeps_duplicates_on_top():
    rng = np.random.default_rng(0)
    cal = ModalityCalibration({"text>text": table(rng.uniform(0.6, 0.9, 300)),
                               "text>image": table(rng.uniform(0.25, 0.45, 300))}, fitted_on=300)
    s = np.linspace(-0.2, 1.0, 200)
    for dm in ("text", "image"):
        out = cal.apply(s, "text", dm)
        assert np.all(np.diff(out) > 0)  # rankings within a modality never change
    # a photo as strong as a typical best photo ranks like a caption as strong as a typical best caption
    assert abs(cal.apply([0.35], "text", "image")[0] - cal.apply([0.75], "text", "text")[0]) < 0.1
    # a duplicate still outranks every typical best match, and every score stays in [0, 1]
    assert 1.0 >= cal.apply([1.0], "text", "text")[0] > cal.apply([0.95], "text", "text")[0] > cal.apply([0.43], "text", "image")[0]
    assert np.all((cal.apply(np.linspace(-1, 1, 500), "text", "image") >= 0) & (cal.apply(np.linspace(-1, 1, 500), "text", "image") <= 1))
    assert cal.covers("text", ["text", "image"]) and not cal.covers("image", ["text"])
    again = ModalityCalibration.from_record(json.loads(json.dumps(cal.to_record())))
    np.testing.assert_allclose(again.apply(s, "text", "image"), cal.apply(s, "text", "image"), atol=1e-5)


def test_fit_dense_excludes_each_pseudo_query_itself():
    v = np.eye(80, dtype=np.float32)  # orthogonal documents: the best match of each, itself excluded, is 0
    cal = fit_dense(v, np.array(["text"] * 40 + ["image"] * 40))
    assert np.allclose(cal.tables["text>text"], 0, atol=1e-6)
    # a modality with too few documents gets no table: searches that include it keep raw cosines
    few = fit_dense(np.eye(60, dtype=np.float32), np.array(["text"] * 12 + ["image"] * 48))
    assert set(few.tables) == {"image>image"} and not few.covers("image", ["image", "text"])


@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory, lit):
    tmp = tmp_path_factory.mktemp("mixed")
    photos = json.loads((FLICKR / "split.json").read_text())["test"][:40]
    caps = flickr_captions(photos)
    docs = [{"id": f"photo:{p}", "image": str(FLICKR / "images" / p)} for p in photos]
    docs += [{"id": f"text:{p}:{i}", "text": c} for p in photos for i, c in enumerate(caps[p][1:])]
    build_index(write_jsonl(tmp / "c.jsonl", docs), lit, tmp / "idx", progress=False)
    queries = [(caps[p][0], p) for p in photos]  # the first caption of each photo is not in the index
    return tmp / "idx", queries


def test_mixed_index_search_finds_photos_for_text_queries(mixed_index):
    idx, queries = mixed_index
    engine = Engine.open(idx)
    try:
        info = engine.info()["segments"][0]
        assert {"text>image", "text>text", "image>image", "image>text"} <= set(info["modality_calibration"])
        qs = [Query(t) for t, _ in queries]
        raw = engine.search(qs, k=5, calibrated=False)
        cal = engine.search(qs, k=5)
        raw_photo_hits = np.mean([any(h.id == f"photo:{p}" for h in hs) for hs, (_, p) in zip(raw, queries)])
        cal_photo_hits = np.mean([any(h.id == f"photo:{p}" for h in hs) for hs, (_, p) in zip(cal, queries)])
        assert cal_photo_hits >= 0.5 and cal_photo_hits > raw_photo_hits + 0.3, (raw_photo_hits, cal_photo_hits)
        # texts stay findable too: the other captions of the same photo are in the calibrated top 5
        assert np.mean([any(h.id.startswith(f"text:{p}:") for h in hs) for hs, (_, p) in zip(cal, queries)]) >= 0.8
        assert all(h.cosine is not None for hs in cal for h in hs)
        assert all(h.cosine is None for hs in raw for h in hs)
        for hs in cal:  # within a modality the calibrated order is the cosine order
            for m in ("text", "image"):
                cos = [h.cosine for h in hs if h.doc.modality == m]
                assert cos == sorted(cos, reverse=True)
        # one modality asked for: nothing to balance, raw cosines
        only = engine.search(qs[:3], k=5, modalities=["image"])
        assert all(h.cosine is None and h.doc.modality == "image" for hs in only for h in hs)
    finally:
        engine.close()


def test_calibration_follows_the_index_when_a_modality_is_added(tmp_path, lit):
    """Texts added to a photo-only index: once there are enough of them (index/modality_calibration.py,
    MIN_DOCUMENTS) the next search (and `info`) fits text tables, and a caption query finds its
    photo more often than raw cosines let it beside notes about other photos (text beats photo
    on raw cosine: the modality gap)."""
    from umr.index import modality_calibration as mc
    from umr.index.store import IndexStore
    from umr.retrieval.items import Item

    photos = json.loads((FLICKR / "split.json").read_text())["test"][:100]
    caps = flickr_captions(photos)
    build_index(write_jsonl(tmp_path / "p.jsonl", [{"id": f"photo:{p}", "image": str(FLICKR / "images" / p)} for p in photos]),
                lit, tmp_path / "idx", progress=False)
    queries = [Query(caps[p][0]) for p in photos[:50]]
    engine = Engine.open(tmp_path / "idx")
    try:
        assert engine.info()["segments"][0]["modality_calibration"] == []  # one modality: cosines
        engine.add([Item(f"note:{p}", caps[p][1]) for p in photos[50:50 + mc.MIN_DOCUMENTS - 12]])
        assert engine.info()["segments"][0]["modality_calibration"] == ["image>image"]  # 20 notes: too few
        few = engine.search(queries[:5], k=3)
        assert all(h.cosine is None for hs in few for h in hs)  # raw cosines, said so by `info`
        engine.add([Item(f"note:{p}", caps[p][1]) for p in photos[50 + mc.MIN_DOCUMENTS - 12:98]])
        seg = engine.info()["segments"][0]
        assert {"text>image", "text>text", "image>image", "image>text"} == set(seg["modality_calibration"])
        hits = engine.search(queries, k=3)
        own = np.mean([hs[0].id == f"photo:{p}" for hs, p in zip(hits, photos)])
        raw = engine.search(queries, k=3, calibrated=False)
        own_raw = np.mean([hs[0].id == f"photo:{p}" for hs, p in zip(raw, photos)])
        assert own > own_raw + 0.05, (own, own_raw)
        assert all(0.0 <= h.score <= 1.0 and h.cosine is not None for hs in hits for h in hs)
        engine.checkpoint()
    finally:
        engine.close()
    store = IndexStore.open(tmp_path / "idx", "read")  # refitted tables are kept in the manifest
    try:
        assert "text>image" in store.segments[0].record["calibration"]["tables"]
        assert set(store.segments[0].record["calibration"]["present"]) == {"image", "text"}
    finally:
        store.close()


def test_an_image_text_query_never_lifts_a_much_weaker_document_above_the_relevant_one(tmp_path, lit):
    """Photos with captions beside unrelated photos alone (issue 24): calibrated across the two
    document modalities, no document more than 0.1 below the relevant one's cosine ranks above it."""
    photos = json.loads((FLICKR / "split.json").read_text())["test"][:40]
    caps = flickr_captions(photos)
    from conftest import DATA

    clothing = sorted((DATA / "clothing-small" / "test").glob("*/*.jpg"))[::8][:40]
    docs = [{"id": f"flickr:{p}", "text": caps[p][0], "image": str(FLICKR / "images" / p)} for p in photos]
    docs += [{"id": f"clothing:{p.name}", "image": str(p)} for p in clothing]
    build_index(write_jsonl(tmp_path / "m.jsonl", docs), lit, tmp_path / "idx", progress=False)
    engine = Engine.open(tmp_path / "idx")
    try:
        hits = engine.search([Query(caps[p][1], str(FLICKR / "images" / p)) for p in photos], k=10)
        for p, hs in zip(photos, hits):
            ids = [h.id for h in hs]
            assert f"flickr:{p}" in ids[:3], ids
            rel = ids.index(f"flickr:{p}")
            assert all(h.cosine >= hs[rel].cosine - 0.1 for h in hs[:rel]), [(h.id, h.cosine) for h in hs[:rel + 1]]
            assert all(0.0 <= h.score <= 1.0 for h in hs)
    finally:
        engine.close()
