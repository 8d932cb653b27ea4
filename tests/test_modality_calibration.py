"""Mixed corpora: scores calibrated across modalities, fitted on the index's own documents."""
import csv
import json

import numpy as np
import pytest

from conftest import FLICKR, write_jsonl
from index.modality_calibration import ModalityCalibration, fit_dense, table
from retrieval.engine import Engine, Query
from retrieval.pipeline import build_index


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
    assert cal.apply([1.0], "text", "text")[0] > 1.0 > cal.apply([0.43], "text", "image")[0]
    assert cal.covers("text", ["text", "image"]) and not cal.covers("image", ["text"])
    again = ModalityCalibration.from_record(json.loads(json.dumps(cal.to_record())))
    np.testing.assert_allclose(again.apply(s, "text", "image"), cal.apply(s, "text", "image"), atol=1e-5)


def test_fit_dense_excludes_each_pseudo_query_itself():
    v = np.eye(20, dtype=np.float32)  # orthogonal documents: the best match of each, itself excluded, is 0
    cal = fit_dense(v, np.array(["text"] * 10 + ["image"] * 10))
    assert np.allclose(cal.tables["text>text"], 0, atol=1e-6)


@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory, lit):
    tmp = tmp_path_factory.mktemp("mixed")
    photos = json.loads((FLICKR / "split.json").read_text())["test"][:30]
    caps: dict[str, list[str]] = {}
    with open(FLICKR / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            if row["image"] in photos:
                caps.setdefault(row["image"], []).append(row["caption"])
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
