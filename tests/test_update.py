"""Registering a new encoder on an index: compensated search into old segments, new segment for new docs."""
import json

import numpy as np
import pytest

from conftest import cli_in_process, write_jsonl
from umr.index import IndexStore
from umr.retrieval.engine import CompensationMissing, Engine, Query
from umr.retrieval.items import Item
from umr.retrieval.indexing.pipeline import build_index
from umr.retrieval.update.fit import fit_update
from umr.index.search_plan import SearchPlan

WORDS = "red green blue small large old new fast slow happy sad dog cat bird tree car house river city boat".split()


def build_v1(tmp_path, encoder):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 4)) + f" {i}" for i in range(600)]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    build_index(corpus, encoder, tmp_path / "idx", progress=False)
    return tmp_path / "idx", texts


@pytest.fixture()
def v1_index(tmp_path, tiny):
    return build_v1(tmp_path, tiny)


@pytest.fixture(scope="module")
def updated(tmp_path_factory, tiny):
    """A text index of tiny-clip, updated to tiny-clip:1 (built and fitted once for the module):
    (index folder, its texts, the update's report)."""
    from umr.retrieval.encoders import load_encoder

    idx, texts = build_v1(tmp_path_factory.mktemp("updated"), tiny)
    store = IndexStore.open(idx)
    # A text-only index gives no image calibration: activating drops image queries, so it takes --force.
    report = fit_update(store, load_encoder("tiny-clip:1"), ["corpus"], force=True)
    store.close()
    return idx, texts, report


@pytest.fixture()
def updated_engine(updated, tmp_path):
    """A writable copy of `updated`, open."""
    import shutil

    idx, texts, _ = updated
    shutil.copytree(idx, tmp_path / "idx")
    engine = Engine.open(tmp_path / "idx")
    yield engine, texts
    engine.close()


def image_calibration(tmp_path, n=40):
    """Image queries for calibrating a text-only index: plain colour squares are enough for tiny-clip."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 255, 3))).save(tmp_path / f"img{i}.png")
    return write_jsonl(tmp_path / "images.jsonl", [{"image": f"img{i}.png"} for i in range(n)])


def top1_rate(engine, texts, n=100):
    hits = engine.search([Query(t) for t in texts[:n]], k=1)
    return np.mean([h[0].id == f"d{i}" for i, h in enumerate(hits)])


def test_the_update_reports_each_modality_of_the_old_segment(updated):
    _, _, report = updated
    seg0 = report["segments"][0]["modalities"]
    assert seg0["text"]["status"] == "ok" and seg0["text"]["chosen"] in ("linear", "mlp", "orthogonal", "kernel")
    assert "no calibration data" in seg0["image"]["status"]


def test_compensated_queries_find_old_documents_that_raw_ones_miss(updated):
    idx, texts, _ = updated
    engine = Engine.open(idx, mode="read")  # the active version is now v2
    assert engine.version == 2 and engine.encoder.spec == "tiny-clip:1"
    compensated = top1_rate(engine, texts)
    # without compensation, v2 queries against v1 vectors are noise
    raw = np.mean([h[0].id == f"d{i}" for i, h in enumerate(engine.store.search(SearchPlan(engine.encoder.encode_texts(texts[:100]), k=1)))])
    assert compensated >= 0.5 and compensated > raw + 0.3, (compensated, raw)
    engine.close()


def test_new_documents_land_in_a_segment_of_the_new_version(updated_engine):
    engine, _ = updated_engine
    engine.add([Item("fresh", "purple elephant 9999")])
    info = engine.info()
    assert [s["encoder_version"] for s in info["segments"]] == [1, 2]
    assert info["segments"][1]["documents"] == 1 and info["segments"][0]["documents"] == 600  # none re-embedded
    assert engine.search([Query("purple elephant 9999")], k=1)[0][0].id == "fresh"


def test_get_and_delete_reach_both_segments(updated_engine):
    engine, texts = updated_engine
    engine.add([Item("fresh", "purple elephant 9999")])
    assert engine.get("d5").text == texts[5] and engine.get("fresh").modality == "text"
    assert engine.delete(["d5", "fresh"]) == ["d5", "fresh"]
    assert all(h.id not in ("d5", "fresh") for h in engine.search([Query(texts[5])], k=5)[0])


def test_queries_of_a_modality_without_calibration_are_refused(updated):
    idx, _, _ = updated
    engine = Engine.open(idx, mode="read")
    with pytest.raises(CompensationMissing, match="image queries"):
        engine.search_vectors(engine.encoder.encode_texts(["x"]), 3, query_modalities=["image"])
    engine.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_cli_update_and_old_encoder_still_refused_for_adds(v1_index):
    idx, texts = v1_index
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--json")
    assert r.returncode == 2 and "image and image,text queries, which segment 0 answers now" in r.stderr, r.stderr
    assert "--force" in r.stderr and json.loads((idx / "manifest.json").read_text())["active_version"] == 1
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--json", "--force")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["active_version"] == 2 and rep["segments"][0]["modalities"]["text"]["pairs"] == 600
    r = cli_in_process("search", idx, texts[3], "-k", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["id"] == "d3"
    r = cli_in_process("index", "info", idx, "--json")
    info = json.loads(r.stdout)
    assert info["active_version"] == 2 and len(info["encoders"]) == 2
    assert info["segments"][0]["compensators"]["2"]["text"]["kind"]
    r = cli_in_process("search", idx, "x", "--encoder", "tiny-clip:2")
    assert r.returncode == 2 and "umr update" in r.stderr


def test_encoder_swap_over_http_has_no_failed_requests(v1_index, tmp_path):
    import threading

    import httpx

    from umr.retrieval.encoders import load_encoder
    from umr.server.app import create_app
    from umr.server.settings import ServerSettings
    from umr.demo import BackgroundServer

    idx, texts = v1_index
    store = IndexStore.open(idx)
    fit_update(store, load_encoder("tiny-clip:1"), ["corpus"], activate=False)  # as `umr update --no-activate`
    store.close()
    engine = Engine.open(idx)
    assert engine.version == 1
    key = "s3cret-admin-key"
    with BackgroundServer(create_app(engine, ServerSettings(admin_key=key, public_read=True))) as srv:
        url = srv.url
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v1/admin/encoder", json={"version": 2}).status_code == 401
            assert c.post("/v1/admin/encoder", json={"version": 2}, headers={"X-API-Key": "wrong"}).status_code == 401
            r = c.post("/v1/admin/encoder", json={"version": 9}, headers={"X-API-Key": key})
            assert r.status_code == 404 and "not registered" in r.json()["error"]["message"]
        failures, served = [], []
        stop = threading.Event()

        def client(i):
            with httpx.Client(base_url=url, timeout=30) as c:
                n = 0
                while not stop.is_set() and n < 400:
                    n += 1
                    j = (i * 37 + n) % 100
                    try:
                        r = c.post("/v1/search", json={"text": texts[j], "k": 1})
                        if r.status_code != 200:
                            failures.append(r.text)
                        else:
                            body = r.json()
                            served.append((time_now(), body["encoder_version"], body["results"][0]["id"] == f"d{j}"))
                    except Exception as e:  # noqa: BLE001
                        failures.append(repr(e))

        import time as _t

        time_now = _t.monotonic
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        _t.sleep(1.0)
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/admin/encoder", json={"version": 2}, headers={"Authorization": f"Bearer {key}"})
            swapped_at = time_now()
            assert r.status_code == 200, r.text
            assert r.json()["active_version"] == 2 and r.json()["previous_version"] == 1
        _t.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures[:3]
        before = [s for s in served if s[0] < swapped_at - 0.5]
        after = [s for s in served if s[0] > swapped_at + 0.2]
        assert before and after
        assert {v for _, v, _ in before} == {1} and {v for _, v, _ in after} == {2}
        assert np.mean([ok for _, _, ok in after]) > 0.5  # v2 through the compensator still finds the documents
        with httpx.Client(base_url=url, timeout=30) as c:
            info = c.get("/v1/index").json()
            assert info["active_version"] == 2 and info["query_encoder"]["version"] == 2
            assert key not in json.dumps(info) and key not in c.get("/metrics").text
    engine.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_eval_guard_refuses_a_worse_update_and_changes_nothing(v1_index, tmp_path, tiny):
    import torch

    idx, texts = v1_index
    queries = write_jsonl(tmp_path / "q.jsonl", [{"text": texts[i], "relevant": [f"d{i}"]} for i in range(0, 600, 6)])
    images = image_calibration(tmp_path)
    before = json.loads((idx / "manifest.json").read_text())
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--method", "mean", "--eval", queries,
                       "--calibration", "corpus", "--calibration", images)  # a shift cannot map two random models
    assert r.returncode == 2 and "not activated" in r.stderr and "--force" in r.stderr, r.stderr
    assert "beyond the noise" in r.stderr and "95% interval" in r.stderr
    after = json.loads((idx / "manifest.json").read_text())
    assert after["encoders"] == before["encoders"] and after["active_version"] == 1
    # the same weights under another name: compensation is near the identity, so it passes
    ckpt = tmp_path / "same.pt"
    torch.save(tiny.model.state_dict(), ckpt)
    plot = tmp_path / "update.png"
    r = cli_in_process("update", idx, "--encoder", f"openclip:umr-tiny@{ckpt}", "--eval", queries, "--reindex-sample", "200",
                       "--calibration", "corpus", "--calibration", images, "--json", "--plot", plot)
    assert r.returncode == 0, r.stderr
    # The comparison as bars: one colour per variant (five or more here), the chosen one outlined.
    from test_cli_behaviour import colour_pixels
    from umr.plots import COLOURS

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(colour_pixels(plot, c) > 200 for c in COLOURS[:5])
    sample = json.loads(r.stdout)["eval"]["reindex_sample"]
    assert sample["documents"] == 300  # 100 judged + 200 others
    # same weights: re-embedding reproduces the stored vectors, so both agree on the sample
    assert sample["new encoder re-indexed on the sample"] == pytest.approx(sample["old encoders on the sample"])
    ev = json.loads(r.stdout)["eval"]["hit_rate@5"]
    assert ev["chosen"] >= ev["old encoders"] and {"mean", "linear", "mlp", "new, uncompensated"} <= set(ev)
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--method", "mean", "--eval", queries, "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["active_version"] == 3
    # new-domain queries are shown beside the old ones; they never refuse an update
    r = cli_in_process("update", idx, "--method", "mean", "--eval-new", queries,
                       "--calibration", "corpus", "--calibration", images, "--no-activate", "--encoder", "tiny-clip:2")
    assert r.returncode == 0, r.stderr
    assert "new-domain queries): old encoders" in r.stdout and "chosen against the old encoders" in r.stdout


def test_eval_queries_of_a_modality_without_calibration_are_named_not_scored(v1_index, tmp_path):
    from PIL import Image

    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.update.fit import UpdateRefused

    idx, texts = v1_index  # texts only: the corpus gives text calibration pairs, no image ones
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    queries = write_jsonl(tmp_path / "q.jsonl", [{"text": texts[0], "relevant": ["d0"]},
                                                 {"image": "red.png", "relevant": ["d1"]}])
    store = IndexStore.open(idx)
    with pytest.raises(UpdateRefused, match=r"image queries \(segment 0\).*--calibration"):
        fit_update(store, load_encoder("tiny-clip:1"), ["corpus"], eval_path=str(queries), activate=False)
    assert store.active_version == 1 and len(store.versions) == 1  # nothing written
    store.close()


def test_the_guard_tolerates_what_the_choice_of_queries_explains():
    from umr.retrieval.update.judged import paired_interval

    old = np.zeros(1000, dtype=bool)
    old[:514] = True
    one_less = old.copy()
    one_less[0] = False  # 0.513 against 0.514: one query in a thousand
    cmp = paired_interval(old, one_less)
    assert cmp["difference"] == pytest.approx(-0.001) and cmp["changed"] == 1
    lo, hi = cmp["interval95"]
    assert lo < 0 <= hi  # within the noise: not a reason to refuse
    much_worse = old.copy()
    much_worse[:100] = False
    assert paired_interval(old, much_worse)["interval95"][1] < 0
    # the same hit rate, but different queries: the interval is wide, centred on zero
    shuffled = np.roll(old, 300)
    lo, hi = paired_interval(old, shuffled)["interval95"]
    assert lo < -0.02 and hi > 0.02 and paired_interval(old, old)["interval95"] == [0.0, 0.0]


def test_passages_are_query_sized_sentences_of_multi_sentence_texts():
    from umr.retrieval.update.calibration_pairs import passages

    assert passages("a dog runs on the grass.") == []  # a caption: already calibrated as the document
    assert passages("The wing was tested at Mach two. Lift rose with the angle of attack! Ok.") == [
        "The wing was tested at Mach two.", "Lift rose with the angle of attack!"]
    assert passages(None) == [] and passages("") == []


def test_default_calibration_adds_passages_with_the_old_encoder(tmp_path, tiny):
    from umr.retrieval.encoders import load_encoder

    rng = np.random.default_rng(1)
    docs = [{"id": f"d{i}", "text": ". ".join(" ".join(rng.choice(WORDS, 6)) for _ in range(3)) + "."} for i in range(80)]
    build_index(write_jsonl(tmp_path / "c.jsonl", docs), tiny, tmp_path / "idx", progress=False)
    store = IndexStore.open(tmp_path / "idx")
    report = fit_update(store, load_encoder("tiny-clip:1"), activate=False)
    assert report["calibration"] == ["corpus", "passages"]
    assert report["segments"][0]["modalities"]["text"]["pairs"] == 80 + 240  # documents + three sentences each
    # An old encoder that no longer loads: the default falls back to the documents and says so.
    seg = store.segments[0]
    seg.record["encoder"]["fingerprint"] = "0" * 16
    report = fit_update(store, load_encoder("tiny-clip:2"), activate=False)
    assert report["segments"][0]["modalities"]["text"]["pairs"] == 80
    assert "passages skipped" in report["segments"][0]["notes"][0]
    with pytest.raises(ValueError, match="no longer loads"):
        fit_update(store, load_encoder("tiny-clip:2"), ["corpus", "passages"], activate=False)
    store.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_an_update_that_leaves_a_segment_unsearchable_is_not_activated(tmp_path, tiny):
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.update.fit import UpdateRefused

    docs = [{"id": f"d{i}", "text": f"word {i}"} for i in range(5)]  # too few pairs for any compensator
    build_index(write_jsonl(tmp_path / "c.jsonl", docs), tiny, tmp_path / "idx", progress=False)
    store = IndexStore.open(tmp_path / "idx")
    with pytest.raises(UpdateRefused, match=r"text, image and image,text queries, which segment 0 answers now.*"
                                            r"no calibration data; only 5 pairs"):
        fit_update(store, load_encoder("tiny-clip:1"), ["corpus"])
    assert store.active_version == 1 and len(store.manifest["encoders"]) == 1  # nothing was written
    report = fit_update(store, load_encoder("tiny-clip:1"), activate=False)  # registering alone is allowed
    assert store.active_version == 1
    # by default, a segment with too few texts of its own is calibrated with umr's generic queries
    assert report["segments"][0]["modalities"]["text"]["sources"] == ["corpus", "generic"]
    store.close()
    r = cli_in_process("update", tmp_path / "idx", "--encoder", "tiny-clip:2")
    assert r.returncode == 2 and "not activated" in r.stderr


def test_generic_queries_are_the_same_everywhere_and_span_the_forms_people_type():
    from umr.retrieval.update.generic_queries import generic_queries

    queries = generic_queries(3000)
    assert len(set(queries)) == 3000 and generic_queries(3000) == queries  # fixed: the same calibration everywhere
    assert queries[:500] == generic_queries(500)
    assert sum(q.endswith(" .") for q in queries) > 300  # captions
    assert sum(q.lower().startswith(("men's", "women's", "kids'")) for q in queries) > 100  # product titles
    assert sum(len(q.split()) <= 3 for q in queries) > 150  # keyword and object queries
    assert not [q for q in queries if q.lower().startswith(("two ", "three ")) and " is " in q.split(" in ")[0]]


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_eval_docs_previews_both_futures_on_copies_and_leaves_the_index_as_it_was(v1_index, tmp_path):
    idx, texts = v1_index
    images = image_calibration(tmp_path)
    new_docs = write_jsonl(tmp_path / "new.jsonl", [{"id": f"n{i}", "text": f"purple elephant {i} {i * 7}"} for i in range(40)])
    old_q = write_jsonl(tmp_path / "old.jsonl", [{"text": texts[i], "relevant": [f"d{i}"]} for i in range(0, 600, 20)])
    new_q = write_jsonl(tmp_path / "newq.jsonl", [{"text": f"purple elephant {i} {i * 7}", "relevant": [f"n{i}"]}
                                                  for i in range(40)])
    before = json.loads((idx / "manifest.json").read_text())
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--calibration", "corpus", "--calibration", images,
                       "--eval", old_q, "--eval-new", new_q, "--eval-docs", new_docs, "--no-activate", "--json")
    assert r.returncode == 0, r.stderr
    preview = json.loads(r.stdout)["preview"]
    assert preview["added"] == 40
    keep, update = preview["hit_rate@5"]["keep the old encoder"], preview["hit_rate@5"]["update"]
    assert set(keep) == set(update) == {"old-domain", "new-domain"}
    assert update["new-domain"] >= 0.9 and keep["new-domain"] >= 0.9  # the new documents are found in both futures
    assert update["old-domain"] >= 0.5  # old documents through the compensator, merged with the new segment
    store = IndexStore.open(idx)  # the index itself: registered only, nothing added
    assert store.count() == 600 and store.active_version == 1 and len(store.segments) == 1
    store.close()
    after = json.loads((idx / "manifest.json").read_text())["segments"]
    assert [(s["id"], s["count"], s["encoder"]) for s in after] == [(s["id"], s["count"], s["encoder"]) for s in before["segments"]]
    r = cli_in_process("update", idx, "--encoder", "tiny-clip:1", "--eval-docs", new_docs, "--no-activate")
    assert r.returncode == 2 and "give at least one of them" in r.stderr


def test_an_add_embedded_before_a_swap_never_lands_in_the_new_versions_segment(v1_index):
    """The version is checked again under the write lock: an add that embedded with v1 while v2
    was activated is refused, and nothing of it is stored."""
    import threading

    from umr.index.errors import IndexMismatch
    from umr.retrieval.encoders import load_encoder

    idx, _ = v1_index
    store = IndexStore.open(idx)
    fit_update(store, load_encoder("tiny-clip:1"), ["corpus"], activate=False, force=True)
    store.close()
    engine = Engine.open(idx)
    before = engine.store.count()
    outcome = {}

    def add():
        try:
            outcome["added"] = engine.add([Item("late", "embedded by version one")])
        except IndexMismatch as e:
            outcome["error"] = str(e)

    with engine.write_lock:  # the add embeds, then waits here while version 2 is activated
        worker = threading.Thread(target=add)
        worker.start()
        worker.join(timeout=5)
        assert worker.is_alive()
        engine.store.activate(2)
    worker.join(timeout=60)
    assert "added" not in outcome and "version 2 was activated" in outcome["error"]
    assert engine.store.count() == before and engine.store.docs.get("late") is None
    engine.close()


def _flip_byte(path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x55
    path.write_bytes(bytes(data))


def test_every_file_beside_the_segments_is_checked_and_a_damaged_one_refused(updated, tmp_path):
    """Compensators, reference queries, uploads and a finished --ray build's shards: each kind is
    named with its checksum (an upload by its hash), so `umr index verify` finds damage to any of
    them, says what --repair cannot mend and how to mend it, and a damaged compensator or
    reference file is refused where it is read instead of changing answers."""
    import shutil

    from conftest import png_bytes
    from umr.index import layout, side_files
    from umr.index.errors import IndexDamaged
    from umr.index.manifest import read_manifest
    from umr.index.verify import verify
    from umr.retrieval.update.reference_queries import read_references

    idx, texts, _ = updated
    base = tmp_path / "base"
    shutil.copytree(idx, base)
    engine = Engine.open(base)
    engine.add([Item("photo", "a red square", png_bytes(color="red"))])  # an upload, kept inside the index
    engine.checkpoint()
    engine.close()
    manifest = read_manifest(base)
    named = list(side_files.recorded_files(manifest, base))
    kinds = {what.split("'s ")[1].split(" ")[0] for what, _, _ in named}
    assert kinds == {"reference", "compensator"}, named
    assert all("sha256" in record for _, record, _ in named)  # every file written with its checksum
    uploads = sorted((base / layout.UPLOADS).glob("*.img"))
    assert len(uploads) == 1
    clean = verify(base)
    assert clean.ok, clean.problems
    assert any("compensator and reference files" in c and "1 uploaded" in c for c in clean.checked), clean.checked

    for what, record, _ in named + [("an uploaded image", {"file": f"{layout.UPLOADS}/{uploads[0].name}"}, "")]:
        copy = tmp_path / f"damaged-{record['file'].replace('/', '_')}"
        shutil.copytree(base, copy)
        _flip_byte(copy / record["file"])
        report = verify(copy)
        assert not report.ok and any(record["file"] in p for p in report.problems), (what, report.problems)
        assert report.unrepairable, what  # --repair cannot write these again: it says who can
        if "compensator" in what:
            with pytest.raises(IndexDamaged, match="compensator.*does not match its checksum.*umr update"):
                Engine.open(copy)
        elif "reference" in what:
            store = IndexStore.open(copy, "read")
            with pytest.raises(IndexDamaged, match="reference queries.*umr update"):
                read_references(store, store.active_version)
            store.close()
        (copy / record["file"]).unlink()
        assert not verify(copy).ok, f"{what} missing goes unnoticed"

    (base / layout.RAY_SHARDS / "shard-000000").mkdir(parents=True)
    left = verify(base)
    assert not left.ok and any(layout.RAY_SHARDS in p for p in left.problems)
    mended = verify(base, repair=True)
    assert any(layout.RAY_SHARDS in r for r in mended.repaired) and not (base / layout.RAY_SHARDS).exists()
    assert verify(base).ok
