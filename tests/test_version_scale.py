"""Merged search over segments of different encoder versions (index/version_scale.py)."""
import json

import numpy as np
import pytest

from conftest import DATA, FLICKR, flickr_captions, write_jsonl
from umr.index import version_scale as vs
from umr.retrieval.engine import Engine, Query


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_scale_puts_an_old_space_on_the_new_ones_cosines_and_keeps_order():
    rng = np.random.default_rng(3)
    new_docs = unit(rng.standard_normal((300, 16)))
    refs = unit(new_docs[:200] + 0.3 * rng.standard_normal((200, 16)))
    # The old space: the same geometry with its cosines compressed (a narrower encoder's scale).
    old_docs, mapped = new_docs * 0.6, refs * 0.7
    a, b = vs.fit(mapped, refs, old_docs, new_docs)
    x, y = mapped @ old_docs.T, refs @ new_docs.T
    assert a == pytest.approx(1 / 0.42, rel=0.02) and abs(b) < 0.02
    np.testing.assert_allclose(a * x + b, y, atol=0.03)
    # The same documents as references: a reference's match with itself is left out.
    a2, _ = vs.fit(new_docs * 0.7, new_docs, old_docs, new_docs, same_items=True)
    assert a2 == pytest.approx(1 / 0.42, rel=0.02)

    s = np.linspace(-3, 3, 1000)
    out = vs.apply(s[None, :], np.array([1.0]), np.array([0.0]))[0]
    assert np.all(np.diff(out) > 0) and np.all(np.abs(out) < 1)  # increasing, inside (-1, 1)
    np.testing.assert_allclose(out[np.abs(s) <= vs.KNEE], s[np.abs(s) <= vs.KNEE], atol=1e-6)
    assert vs.apply(np.array([[0.5, -np.inf]]), 2.0, -0.2)[0, 1] == -np.inf
    assert vs.doc_key(["image"], ["image", "text"]) == "image"
    assert vs.doc_key(None, ["image"]) == "image" and vs.doc_key(None, ["image", "text"]) == vs.ALL
    assert not vs.valid([0.0, 1.0]) and not vs.valid([float("nan"), 0.0]) and vs.valid([1.2, -0.1])


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_the_readme_upgrade_then_add_flow_keeps_old_and_new_documents_findable(tmp_path, capsys):
    """README "From lit-base v1 to v2", then a few new photos added: a new segment of 12 must
    not bury the old photos under their own captions, and finds its own class queries."""
    from umr.cli import main

    def umr(*args) -> str:
        capsys.readouterr()
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    photos = json.loads((FLICKR / "split.json").read_text())["test"][:60]
    caps = flickr_captions(photos)
    old_q = [(caps[p][0], p) for p in photos]
    write_jsonl(tmp_path / "photos.jsonl", [{"id": p, "image": str(FLICKR / "images" / p)} for p in photos])
    new = [p for c in ("dress", "skirt") for p in sorted((DATA / "clothing-small" / "test" / c).glob("*.jpg"))[:6]]
    write_jsonl(tmp_path / "new.jsonl", [{"id": f"{p.parent.name}/{p.name}", "image": str(p)} for p in new])

    def old_ranks(engine, **kw):
        hits = engine.search([Query(t) for t, _ in old_q], k=10, modalities=["image"], **kw)
        return [next((i for i, h in enumerate(hs) if h.id == p), 10) for hs, (_, p) in zip(hits, old_q)], hits

    umr("index", "build", tmp_path / "photos.jsonl", "--encoder", "lit-base@1", "--out", tmp_path / "idx")
    engine = Engine.open(tmp_path / "idx")
    before, _ = old_ranks(engine)
    engine.close()
    umr("update", tmp_path / "idx", "--encoder", "lit-base")
    umr("index", "add", tmp_path / "idx", tmp_path / "new.jsonl")
    info = umr("index", "info", tmp_path / "idx")
    assert info.splitlines()[1].startswith("encoder lit-base ") and "(version 2, active" in info
    assert "segment 1 (encoder version 2, lit-base): 12 documents" in info and "scores onto version 2's scale" in info

    engine = Engine.open(tmp_path / "idx")
    after, hits = old_ranks(engine)
    top5 = lambda ranks: sum(r < 5 for r in ranks)  # noqa: E731
    assert top5(after) >= 0.95 * top5(before), (before, after)
    intruders = sum(h.id.startswith(("dress/", "skirt/")) for hs in hits for h in hs[:5])
    raw_after, raw_hits = old_ranks(engine, calibrated=False)
    raw_intruders = sum(h.id.startswith(("dress/", "skirt/")) for hs in raw_hits for h in hs[:5])
    assert intruders < raw_intruders / 2, (intruders, raw_intruders)  # new photos above old captions' photos
    # Merged scores: the active encoder's cosines, inside (-1, 1), with the raw cosine beside them;
    # calibrated=False: raw cosines and nothing else.
    old_hit = next(h for hs in hits for h in hs if h.segment == 0)
    assert -1 < old_hit.score < 1 and old_hit.cosine is not None and old_hit.score != old_hit.cosine
    assert all(h.cosine is None for hs in raw_hits for h in hs)
    # ... and no score map: a raw hit's score is the raw cosine its calibrated twin carries.
    twins = [(raw.score, cal.cosine) for hs, rs in zip(hits, raw_hits) for cal in hs for raw in rs
             if raw.id == cal.id and cal.segment == 0]
    assert twins and all(abs(r - c) < 1e-5 for r, c in twins), twins[:5]
    for c in ("dress", "skirt"):
        found = engine.search([Query(f"a photo of a {c}")], k=6, modalities=["image"])[0]
        assert sum(h.id.startswith(c + "/") for h in found[:6]) >= 3, [h.id for h in found]
    engine.close()

    # An index updated by an umr before scales: they are fitted on the first merged search, the
    # same as `umr update` fits them, and kept by the next checkpoint.
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    written = {m: c.pop("scales") for m, c in manifest["segments"][0]["compensators"]["2"].items()}
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.open(tmp_path / "idx")
    assert engine.scales[0] == {}
    again, _ = old_ranks(engine)
    assert again == after and engine.scales[0]["text"] == written["text"]
    engine.checkpoint()
    engine.close()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["segments"][0]["compensators"]["2"]["text"]["scales"] == written["text"]
    # A read-only process (`umr search`, a replica) keeps them too, as registrations are kept.
    for c in manifest["segments"][0]["compensators"]["2"].values():
        c.pop("scales")
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    umr("search", tmp_path / "idx", "a dog", "-k", "3")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["segments"][0]["compensators"]["2"]["text"]["scales"] == written["text"]

    # The way back: v1 again, its queries reaching the v2 segment through compensators fitted
    # the same way, and forward again.
    out = umr("update", tmp_path / "idx", "--to", "1")
    assert "encoder version 1 (lit-base@1) is active again" in out
    engine = Engine.open(tmp_path / "idx")
    assert engine.version == 1 and set(engine.compensators) == {1}
    back, _ = old_ranks(engine)
    assert top5(back) >= 0.95 * top5(before), (before, back)
    found = engine.search([Query("a photo of a dress")], k=12, modalities=["image"])[0]
    assert any(h.segment == 1 for h in found)  # the photos only v2 embedded are still searched
    engine.close()
    umr("update", tmp_path / "idx", "--to", "2")
    assert "(version 2, active" in umr("index", "info", tmp_path / "idx")
    capsys.readouterr()
    assert main(["update", str(tmp_path / "idx"), "--to", "7"]) == 2
    err = capsys.readouterr().err
    assert "--to 7: " in err and "has encoder versions 1, 2" in err, err


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
    engine.calibrated = False  # raw cosines, as merged search did before
    raw_old = old_rate(engine)
    engine.close()
    assert merged_old >= 0.9 * old_alone and merged_old >= raw_old, (old_alone, merged_old, raw_old)
    assert merged_new >= 0.9 * new_alone, (new_alone, merged_new)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["encoders"][1]["reference"]["queries"]["text"] == 2000


def test_merged_search_over_http_fits_missing_scales_once_under_concurrent_first_searches_and_goes_back(tmp_path, tiny):
    """An index updated before scales existed, served: concurrent first searches fit the scales
    once and agree; GET /v1/index names the active encoder and the scales; the admin swap back
    to version 1 is refused with the command that fits what it lacks, and works after it."""
    import threading

    import httpx

    from umr.index import IndexStore
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.items import Item
    from umr.retrieval.indexing.pipeline import build_index
    from umr.retrieval.update.fit import fit_update
    from umr.server.app import create_app
    from umr.server.settings import ServerSettings
    from umr.cli import main
    from umr.demo import BackgroundServer

    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "circle", "square", "dog", "cat", "house", "tree", "car", "boat", "sun"]
    texts = [" ".join(rng.choice(words, 4)) + f" {i}" for i in range(200)]
    build_index(write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]), tiny,
                tmp_path / "idx", progress=False)
    store = IndexStore.open(tmp_path / "idx")
    fit_update(store, load_encoder("tiny-clip:1"), ["corpus"], force=True)
    store.close()
    engine = Engine.open(tmp_path / "idx")
    engine.add([Item(f"n{i}", t) for i, t in enumerate(texts[:60])])
    engine.checkpoint()
    engine.close()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["segments"][0]["compensators"]["2"]["text"].pop("scales")  # as an older umr wrote it
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))

    engine = Engine.open(tmp_path / "idx")
    key = "s3cret-admin-key"
    with BackgroundServer(create_app(engine, ServerSettings(admin_key=key, public_read=True))) as srv:
        answers: dict[int, list] = {}
        errors = []

        def client(i):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for j in range(0, 60, 3):
                    r = c.post("/v1/search", json={"text": texts[j], "k": 5})
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    answers.setdefault(j, []).append([(h["id"], h["score"], h["cosine"]) for h in r.json()["results"]])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:2]
        def same(x, y):  # one fit, one answer (scores to float32 rounding: batches differ in shape)
            return [h[0] for h in x] == [h[0] for h in y] and np.allclose([h[1] for h in x], [h[1] for h in y], atol=1e-5)

        assert all(len(a) == 6 and all(same(x, a[0]) for x in a) for a in answers.values()), answers
        for j, a in answers.items():
            # the text's own two copies first: the new one (cosine 1) and the old one through its map
            assert {a[0][0][0], a[0][1][0]} == {f"d{j}", f"n{j}"}, a[0]
            assert all(-1 < s < 1 and c is not None for _, s, c in a[0])
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            info = c.get("/v1/index").json()
            assert info["encoder"]["spec"] == "tiny-clip:1" and info["active_version"] == 2
            seg0 = info["segments"][0]
            assert seg0["encoder_version"] == 1 and seg0["compensators"]["2"]["text"]["scales"]["text"][0] > 0
            r = c.post("/v1/admin/encoder", json={"version": 1}, headers={"X-API-Key": key})
            assert r.status_code == 409 and "--to 1 --no-activate" in r.json()["error"]["message"], r.text
            assert main(["update", str(tmp_path / "idx"), "--to", "1", "--no-activate", "--calibration", "corpus",
                         "--force"]) == 0  # beside the running server
            r = c.post("/v1/admin/encoder", json={"version": 1}, headers={"X-API-Key": key})
            assert r.status_code == 200 and r.json()["active_version"] == 1, r.text
            r = c.post("/v1/search", json={"text": texts[3], "k": 3})
            assert r.status_code == 200 and r.json()["encoder_version"] == 1
            assert r.json()["results"][0]["id"] in ("d3", "n3")
