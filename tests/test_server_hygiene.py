"""One request never hurts another, and nothing acknowledged is unservable (issue 11, parts 1-2).

Served by uvicorn on 127.0.0.1, spoken to over real sockets."""
import asyncio
import base64
import json
import logging
import sqlite3
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import cli_in_process, png_bytes, served_index, write_jsonl
from umr.retrieval.encoders.base import Prepared
from umr.retrieval.engine import Engine, Query
from umr.retrieval.items import Item
from umr.server.settings import ServerSettings


def png(size, color="red") -> bytes:
    return png_bytes(size, color)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("hyg")
    records = [{"id": f"t{i}", "text": f"document number {i}", "metadata": {"n": i}} for i in range(40)]
    records.append({"id": "blue", "image": "blue.png"})
    settings = ServerSettings(max_body_bytes=2_000_000, max_image_bytes=1_000_000)
    with served_index(tmp, tiny, records, settings, images=[("blue.png", (64, 64), "blue")]) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, tmp, engine


def post_raw(client, path, body: str):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def test_a_poisoned_query_among_concurrent_ones_fails_alone(served):
    client, _, _ = served
    url = str(client.base_url)
    statuses, answers, poisoned = [], {}, []

    def good(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(10):
                r = c.post("/v1/search", json={"text": f"document number {i}", "k": 1})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    answers.setdefault(i, set()).add(r.json()["results"][0]["id"])

    def bad():
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(10):
                poisoned.append(post_raw(c, "/v1/search", '{"text": "dog \\ud800 cat", "k": 1}'))

    threads = [threading.Thread(target=good, args=(i,)) for i in range(16)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(statuses) == 160 and set(statuses) == {200}, sorted(set(statuses))
    assert all(len(ids) == 1 for ids in answers.values())  # each good query always got its own answer
    assert {r.status_code for r in poisoned} == {422}
    err = poisoned[0].json()["error"]
    assert err["code"] == "invalid_text" and "lone surrogate" in err["message"]


def test_a_member_that_fails_inside_a_batch_fails_alone(served, caplog):
    """A query that passes every check but breaks the forward (here: an image tensor of a shape
    the tower cannot take) is co-batched with good ones; the good ones get their answers."""
    import torch

    from umr.server.batching import Pending, QueryBatcher
    from umr.server.metrics import Metrics

    _, _, engine = served
    texts = [f"document number {i}" for i in range(8)]
    expected = [[h.id for h in hs] for hs in engine.search([Query(t) for t in texts], k=3)]
    good = [Pending(engine, engine.prepare_query(Query(t)), 3, None, None) for t in texts]
    broken = Pending(engine, Prepared(None, torch.zeros(3, 5, 7, dtype=torch.uint8)), 3, None, None)

    async def scenario():
        batcher = QueryBatcher(ServerSettings(batch_max_size=32), Metrics())
        await batcher.start()
        try:
            return await asyncio.gather(batcher.run(good[:4]), batcher.run([broken]), batcher.run(good[4:]),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    with caplog.at_level(logging.WARNING, logger="umr.server"):
        first, failed, second = asyncio.run(scenario())
    assert len(failed) == 1 and isinstance(failed[0], Exception)  # that query alone carries its error
    got = [[h.id for h in hs] for hs in [*first, *second]]
    assert got == expected
    assert any("batch of 9 failed" in r.getMessage() for r in caplog.records)  # they really shared a batch


def test_unexpected_errors_are_json_500s_with_an_id_in_the_log(served, caplog):
    client, tmp, engine = served
    assert client.post("/v1/documents", json={"documents": [{"id": "broken", "text": "a stored document"}]}).status_code == 200
    # Damage the stored row behind the server's back (as an older umr or a disk error could):
    # its text a blob, which nothing in umr expects.
    db = sqlite3.connect(tmp / "idx" / "docs.sqlite")
    db.execute("UPDATE docs SET text=X'DEADBEEF' WHERE id='broken'")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, logger="umr.server"):
        r = client.get("/v1/documents/broken")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "internal" and err["id"] in err["message"]
    assert err["id"] == r.headers["x-request-id"] and len(err["id"]) == 16  # the request's own id
    assert any(err["id"] in rec.getMessage() and rec.exc_info for rec in caplog.records)
    # Damage umr recognises (metadata that does not decode) is named as such, with an id too.
    db = sqlite3.connect(tmp / "idx" / "docs.sqlite")
    db.execute("UPDATE docs SET text='ok', metadata='{not json' WHERE id='broken'")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, logger="umr.server"):
        r = client.get("/v1/documents/broken")
    err = r.json()["error"]
    assert r.status_code == 500 and err["code"] == "index_damaged" and err["id"] in err["message"]
    assert any(err["id"] in rec.getMessage() for rec in caplog.records)
    assert client.get("/v1/documents/t1").status_code == 200
    assert client.delete("/v1/documents/broken").status_code == 200


@pytest.mark.parametrize("case", ["surrogate_metadata", "surrogate_text", "deep_metadata", "huge_metadata",
                                  "nan_metadata", "infinity_metadata", "zero_width_text", "surrogate_id"])
def test_what_cannot_be_served_back_is_refused_at_the_write(served, case):
    client, _, _ = served
    deep = "[" * 40 + "]" * 40
    bodies = {
        "surrogate_metadata": ('{"id": "m1", "text": "ok", "metadata": {"a": "x\\udc00y"}}', "lone surrogate"),
        "surrogate_text": ('{"id": "m2", "text": "bad \\ud800"}', "lone surrogate"),
        "deep_metadata": ('{"id": "m3", "text": "ok", "metadata": {"a": %s}}' % deep, "nested deeper than 32"),
        "huge_metadata": (json.dumps({"id": "m4", "text": "ok", "metadata": {"blob": "x" * 70_000}}), "over the limit of 65536"),
        "nan_metadata": ('{"id": "m5", "text": "ok", "metadata": {"score": NaN}}', "NaN"),
        "infinity_metadata": ('{"id": "m6", "text": "ok", "metadata": {"score": -Infinity}}', "Infinity"),
        "zero_width_text": ('{"id": "m7", "text": "\\u200b\\u200d\\ufeff "}', "neither text nor image"),
        "surrogate_id": ('{"id": "m8\\ud800", "text": "ok"}', "unicode"),
    }
    doc, message = bodies[case]
    before = client.get("/v1/index").json()["documents"]
    # One good document beside the bad one: the request is refused whole.
    r = post_raw(client, "/v1/documents", '{"documents": [{"id": "fine-%s", "text": "fine"}, %s]}' % (case, doc))
    assert r.status_code == 422, r.text
    assert message.lower() in r.json()["error"]["message"].lower()
    assert client.get("/v1/index").json()["documents"] == before
    assert client.get(f"/v1/documents/fine-{case}").status_code == 404


def test_strict_types_empty_texts_and_limits_named(served):
    client, _, _ = served
    r = client.post("/v1/search", json={"text": "x", "k": True})
    assert r.status_code == 422 and "k" in r.json()["error"]["message"]
    r = client.post("/v1/search", json={"text": "\u200b\u2060\ufeff"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_query"
    r = post_raw(client, "/v1/search", '{"text": "x", "filter": {"n": NaN}}')
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_filter"

    def chunks():  # no Content-Length: the limit must be found while the body streams in
        yield b'{"text": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}'

    r = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "limit_body_bytes" and "max_body_bytes" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_images_as_browsers_send_them(served):
    client, _, _ = served
    data = base64.b64encode(png((48, 48), "blue")).decode()
    plain = client.post("/v1/search", json={"image": data, "k": 3}).json()["results"]
    data_url = client.post("/v1/search", json={"image": "data:image/png;base64," + data, "k": 3})
    wrapped = "\r\n".join(data[i:i + 76] for i in range(0, len(data), 76))  # MIME line breaks
    mime = client.post("/v1/search", json={"image": wrapped, "k": 3})
    assert data_url.status_code == 200 and mime.status_code == 200
    assert [h["id"] for h in data_url.json()["results"]] == [h["id"] for h in plain]
    assert [h["id"] for h in mime.json()["results"]] == [h["id"] for h in plain]
    assert plain[0]["id"] == "blue"
    r = client.post("/v1/search", json={"image": "data:image/png," + data})
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"]


def test_extreme_image_shapes_are_refused_or_cut_to_their_centre(served):
    client, _, _ = served
    r = client.post("/v1/search", json={"image": base64.b64encode(png((1, 12000))).decode()})
    assert r.status_code == 413 and r.json()["error"]["code"] == "limit_image_aspect"
    assert "aspect ratio" in r.json()["error"]["message"]
    # Within the limit an extreme shape is cut to 4:1 before resizing: answered, and fast.
    r = client.post("/v1/search", json={"image": base64.b64encode(png((6000, 100))).decode(), "k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_centre_cut_changes_nothing_a_clip_style_tower_sees(lit):
    from umr.retrieval.images import ImageLimits, centre_crop_to_aspect, open_image

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (120, 1500, 3), dtype=np.uint8))
    img = open_image(wide, ImageLimits())
    assert img.size == (480, 120)  # centre 4:1
    assert centre_crop_to_aspect(wide, 4.0).tobytes() == img.tobytes()
    cut = lit.embed([lit.prepare(Item("w", None, wide))])
    whole = lit.embed([Prepared(None, lit.preprocess_image(wide))])  # the tower's own resize + centre crop
    assert float(cut[0] @ whole[0]) > 0.99
    with pytest.raises(ValueError, match="aspect ratio"):
        open_image(Image.new("RGB", (2, 300)), ImageLimits(max_aspect=100))


def test_corpus_records_that_could_not_be_served_are_rejected_by_the_build(tmp_path):
    lines = ['{"id": "ok1", "text": "a fine record"}',
             '{"id": "nan", "text": "has a NaN", "metadata": {"x": NaN}}',
             '{"id": "sur\\ud800", "text": "surrogate id"}',
             '{"id": "zw", "text": "\\u200b\\u200b"}',
             '{"id": "deep", "text": "deep", "metadata": {"a": %s}}' % ("[" * 40 + "]" * 40),
             '{"id": "ok2", "text": "another fine record"}']
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx", "--json")
    assert r.returncode == 0, r.stderr
    engine = Engine.open(tmp_path / "idx", "tiny-clip")
    assert engine.store.count() == 2
    engine.close()
    report = json.loads(r.stdout)
    assert report["indexed"] == 2 and report["rejected"] == 4
    reasons = json.dumps(report["rejections"])
    for word in ("NaN", "lone surrogate", "neither text nor image", "nested deeper"):
        assert word in reasons, (word, reasons[:2000])


def test_the_document_store_refuses_what_it_could_not_return(tmp_path):
    from umr.index.documents import DocRecord
    from umr.index.docstore import DocStore
    from umr.index.document_rules import InvalidDocument

    store = DocStore(str(tmp_path / "d.sqlite"))
    vec = np.zeros((1, 4), np.float32)
    for doc in (DocRecord("a", "text", "x", None, {"v": float("inf")}), DocRecord("b\udfff", "text", "x"),
                DocRecord("c", "text", "x", None, {"k": {"deeper": [[[]]] * 2, "s": "\ud83d"}})):
        with pytest.raises(InvalidDocument):
            store.add(0, 0, [doc], vec)
    store.add(0, 0, [DocRecord("ok", "text", "fine", None, {"emoji": "\U0001F600", "n": 1.5})], vec)
    assert store.get("ok")[0].metadata == {"emoji": "\U0001F600", "n": 1.5}
    assert store.doc_count() == 1
    store.close()


def test_reduced_jpeg_decoding_can_be_switched_off(tmp_path, monkeypatch):
    from umr.retrieval.images import open_image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    assert open_image(tmp_path / "big.jpg", min_side=224).size == (300, 225)  # decoded at 1/4 in the DCT
    monkeypatch.setenv("UMR_JPEG_DRAFT", "0")
    assert open_image(tmp_path / "big.jpg", min_side=224).size == (1200, 900)
