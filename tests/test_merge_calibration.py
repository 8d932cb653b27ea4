"""Merged search over segments of different encoder versions (index/merge_calibration.py)."""
import json

import numpy as np
import pytest

from conftest import DATA, FLICKR, write_jsonl
from index import merge_calibration as merge
from retrieval.engine import Engine, Query


def test_tables_are_fitted_at_the_rank_of_the_decision_and_order_within_a_segment_is_kept():
    rng = np.random.default_rng(0)
    scores = np.sort(rng.normal(0.2, 0.05, (300, 5)), axis=1)[:, ::-1]
    assert np.array_equal(merge.rank_scores(scores, 5), scores[:, 4])
    assert np.array_equal(merge.rank_scores(scores, 2), scores[:, 1])
    short = np.array([[0.5, 0.4, -np.inf, -np.inf, -np.inf]])  # a segment of two documents
    assert merge.rank_scores(short, 5)[0] == 0.4

    cal = merge.fit(lambda q, mods: scores, {"text": np.zeros((300, 8))}, ["image"], fitted_on=50)
    assert cal.covers("text", ["image@5", "image@1", "*@5"]) and not cal.covers("image", ["image@5"])
    level = float(np.median(scores[:, 4]))  # the typical 5th-best score of a reference query
    raw = np.array([[level - 0.1, level - 0.05, level, level + 0.05, 0.6]])
    out = cal.apply(raw, "text", "image@5")
    assert np.all(np.diff(out[0]) > 0)  # monotone: rankings within the segment never change
    assert out[0, 2] == pytest.approx(0.5, abs=0.02) and out[0, 4] > 1.0  # the typical level; above every reference

    assert merge.doc_key(["image"], ["image", "text"]) == "image"
    assert merge.doc_key(None, ["image"]) == "image" and merge.doc_key(None, ["image", "text"]) == merge.ALL


def test_a_query_modality_is_merged_by_calibration_only_where_every_segment_has_a_table():
    class Seg:
        def __init__(self, i, n=10):
            self.id, self.alive = i, np.ones(n, dtype=bool)

    text_only = merge.fit(lambda q, mods: np.ones((20, 5)), {"text": np.zeros((20, 4))}, ["image"], 20)
    both = merge.fit(lambda q, mods: np.ones((20, 5)), {"text": np.zeros((20, 4)), "image": np.zeros((20, 4))},
                     ["image"], 20)
    rows = merge.merge_rows({0: text_only, 1: both}, [Seg(0), Seg(1)], np.array(["text", "image", "text"]), None,
                            lambda seg: ["image"])
    assert set(rows[0]) == {("text", "image@5")} and list(rows[0][("text", "image@5")]) == [0, 2]
    assert set(rows[1]) == {("text", "image@5")}  # image queries stay raw in both: segment 0 has no table for them
    # while one segment holds two documents, every segment is compared at rank 2
    rows = merge.merge_rows({0: text_only, 1: both}, [Seg(0), Seg(1, n=2)], np.array(["text"]), None, lambda s: ["image"])
    assert set(rows[0]) == set(rows[1]) == {("text", "image@2")}


@pytest.mark.slow
def test_a_new_domain_added_after_an_update_does_not_push_old_photos_out_of_their_captions(tmp_path, capsys):
    """The scenario of issue 10: photos indexed with lit-base@1, an encoder trained further on
    clothing photos, `umr update` with no calibration flags, then the clothing photos added.
    The commands run in this process (`umr.cli.main`), so the towers load once."""
    from umr.cli import main

    def umr(*args) -> str:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    split = json.loads((FLICKR / "split.json").read_text())
    photos = split["test"][:100]
    captions = {}
    for line in (FLICKR / "captions.txt").read_text().splitlines()[1:]:
        name, caption = line.split(",", 1)
        captions.setdefault(name, caption)
    old_q = [(captions[p], p) for p in photos]
    write_jsonl(tmp_path / "photos.jsonl", [{"id": p, "image": str(FLICKR / "images" / p)} for p in photos])
    clothing = sorted((DATA / "clothing-small" / "test").glob("*/*.jpg"))
    write_jsonl(tmp_path / "clothing.jsonl", [{"id": f"{p.parent.name}/{p.name}", "image": str(p)} for p in clothing])
    classes = sorted({p.parent.name for p in clothing})
    new_q = [(f"a photo of a {c}", c) for c in classes] + [(f"a {c} on a white background", c) for c in classes]

    def old_rate(engine):
        hits = engine.search([Query(t) for t, _ in old_q], k=5, modalities=["image"])
        return float(np.mean([any(h.id == p for h in hs) for hs, (_, p) in zip(hits, old_q)]))

    def new_precision(engine):
        hits = engine.search([Query(t) for t, _ in new_q], k=10, modalities=["image"])
        return float(np.mean([np.mean([h.id.startswith(c + "/") for h in hs]) for hs, (_, c) in zip(hits, new_q)]))

    umr("index", "build", tmp_path / "photos.jsonl", "--encoder", "lit-base@1", "--out", tmp_path / "idx")
    umr("train", "--pairs", DATA / "clothing-small" / "test", "--encoder", "lit-base@1", "--epochs", "30",
        "--lr", "3e-3", "--weight-decay", "0.1", "--out", tmp_path / "v2")
    umr("index", "build", tmp_path / "clothing.jsonl", "--encoder", tmp_path / "v2", "--out", tmp_path / "new")
    engine = Engine.open(tmp_path / "idx")
    old_alone = old_rate(engine)
    engine.close()
    engine = Engine.open(tmp_path / "new")
    new_alone = new_precision(engine)
    engine.close()

    report = json.loads(umr("update", tmp_path / "idx", "--encoder", tmp_path / "v2", "--json"))  # no calibration flags
    text = report["segments"][0]["modalities"]["text"]
    assert text["status"] == "ok" and text["sources"] == ["generic"]  # a photo library: umr's own queries
    umr("index", "add", tmp_path / "idx", tmp_path / "clothing.jsonl")

    engine = Engine.open(tmp_path / "idx")
    assert [s["documents"] for s in engine.info()["segments"]] == [100, len(clothing)]
    merged_old, merged_new = old_rate(engine), new_precision(engine)
    engine.calibrate_scores = False  # raw cosines, as merged search did before
    raw_old = old_rate(engine)
    engine.close()
    assert merged_old >= 0.9 * old_alone and merged_old > raw_old + 0.1, (old_alone, merged_old, raw_old)
    assert merged_new >= 0.9 * new_alone, (new_alone, merged_new)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["encoders"][1]["reference"]["queries"]["text"] == 2000
