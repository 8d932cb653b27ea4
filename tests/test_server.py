"""The HTTP service, served by uvicorn on 127.0.0.1 and spoken to over real sockets."""
import base64
import io
import threading

import httpx
import pytest
from PIL import Image

from conftest import png_bytes, served_index
from umr.server.settings import ServerSettings


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("srv")
    records = [{"id": f"t{i}", "text": f"document number {i}", "metadata": {"group": "even" if i % 2 == 0 else "odd"}}
               for i in range(40)]
    records.append({"id": "blue", "image": "blue.png", "metadata": {"group": "img"}})
    settings = ServerSettings(max_k=100, max_text_chars=500, max_image_pixels=1_000_000, max_image_bytes=2_000_000,
                              max_body_bytes=4_000_000, max_batch_queries=8)
    with served_index(tmp, tiny, records, settings, images=[("blue.png", (64, 64), "blue")]) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, tmp


def assert_alive(client):
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.post("/v1/search", json={"text": "document", "k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_text_search_filter_and_modality(served):
    client, _ = served
    r = client.post("/v1/search", json={"text": "document number 3", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == 5 and body["took_ms"] > 0
    assert body["results"][0]["score"] >= body["results"][-1]["score"]
    r = client.post("/v1/search", json={"text": "document", "k": 40, "filter": {"group": "odd"}})
    assert {h["metadata"]["group"] for h in r.json()["results"]} == {"odd"} and len(r.json()["results"]) == 20
    r = client.post("/v1/search", json={"text": "document", "k": 3, "modality": "image"})
    assert [h["id"] for h in r.json()["results"]] == ["blue"]


def test_image_queries_json_and_multipart(served):
    client, tmp = served
    img = (tmp / "blue.png").read_bytes()
    r = client.post("/v1/search", json={"image": base64.b64encode(img).decode(), "k": 1})
    assert r.json()["results"][0]["id"] == "blue"  # the identical image scores highest
    r = client.post("/v1/search/image", files={"file": ("q.png", img, "image/png")}, data={"k": "1"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "blue"
    r = client.post("/v1/search/image", files={"file": ("q.png", img, "image/png")}, data={"k": "3", "text": "blue"})
    fused = r.json()["results"]
    assert r.status_code == 200 and len(fused) == 3 and fused[0]["id"] == "blue"
    # The upload and the JSON form of the same image+text query are the same query.
    same = client.post("/v1/search", json={"image": base64.b64encode(img).decode(), "text": "blue", "k": 3}).json()
    assert [(h["id"], round(h["score"], 5)) for h in same["results"]] == [(h["id"], round(h["score"], 5)) for h in fused]


def test_batch_search_matches_single_queries(served):
    client, _ = served
    qs = [{"text": f"document number {i}", "k": 3} for i in range(5)]
    batch = client.post("/v1/search/batch", json={"queries": qs}).json()["results"]
    singles = [client.post("/v1/search", json=q).json()["results"] for q in qs]
    assert [[h["id"] for h in r] for r in batch] == [[h["id"] for h in r] for r in singles]
    r = client.post("/v1/search/batch", json={"queries": qs * 2})
    assert r.status_code == 422 and "max_batch_queries" in r.json()["error"]["message"]


def test_documents_add_get_delete_and_search(served):
    client, tmp = served
    img = base64.b64encode(png_bytes((30, 30), "green")).decode()
    r = client.post("/v1/documents", json={"documents": [
        {"id": "new/1", "text": "a brand new document about zebras", "metadata": {"group": "new"}},
        {"id": "new/2", "image": img}]})
    assert r.status_code == 200 and r.json()["added"] == ["new/1", "new/2"]
    doc = client.get("/v1/documents/new/1").json()
    assert doc["text"].startswith("a brand new") and doc["metadata"] == {"group": "new"}
    ref = client.get("/v1/documents/new/2").json()["image"]
    assert ref == "/v1/documents/new%2F2/image" and client.get(ref).content == base64.b64decode(img)
    hits = client.post("/v1/search", json={"text": "zebras", "k": 5, "filter": {"group": "new"}}).json()["results"]
    assert [h["id"] for h in hits] == ["new/1"]
    # durable: a fresh open of the index directory (another process would see the same) has them
    from umr.index import IndexStore

    other = IndexStore.open(tmp / "idx", "read")
    assert other.get("new/1").text.startswith("a brand new")
    other.close()
    assert client.delete("/v1/documents/new/1").status_code == 200
    r = client.get("/v1/documents/new/1")
    assert r.status_code == 404 and "new/1" in r.json()["error"]["message"]
    assert client.delete("/v1/documents/new/1").status_code == 404
    assert all(h["id"] != "new/1" for h in client.post("/v1/search", json={"text": "zebras", "k": 10}).json()["results"])


def test_index_info_metrics_and_openapi(served):
    client, _ = served
    info = client.get("/v1/index").json()
    assert info["state"] == "ready" and info["encoder"]["spec"] == "tiny-clip"
    assert info["query_encoder"]["fingerprint"] == info["encoder"]["fingerprint"]
    client.post("/v1/search", json={"text": "x", "k": 1})
    text = client.get("/metrics").text
    assert 'umr_requests_total{endpoint="/v1/search",status="200"}' in text
    assert "umr_encode_seconds_count" in text and "umr_search_seconds_count" in text
    assert "umr_request_latency_seconds_bucket" in text
    assert client.get("/docs").status_code == 200
    assert "/v1/search/batch" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("case", [
    "corrupt_base64", "not_an_image", "huge_image", "k_zero", "k_huge", "unknown_field", "wrong_content_type",
    "empty_query", "long_text", "body_too_big", "bad_modality", "bad_filter", "truncated_json", "upload_not_image",
])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served, case):
    client, _ = served
    expect = {
        "corrupt_base64": (lambda: client.post("/v1/search", json={"image": "@@not base64@@"}), 400, "not valid base64"),
        "not_an_image": (lambda: client.post("/v1/search", json={"image": base64.b64encode(b"hello, I am text").decode()}),
                         400, "not a readable image"),
        "huge_image": (lambda: client.post("/v1/search", json={"image": base64.b64encode(_bomb()).decode()}),
                       413, "over the limit of 1000000"),
        "k_zero": (lambda: client.post("/v1/search", json={"text": "x", "k": 0}), 422, "max_k"),
        "k_huge": (lambda: client.post("/v1/search", json={"text": "x", "k": 10**6}), 422, "between 1 and 100"),
        "unknown_field": (lambda: client.post("/v1/search", json={"text": "x", "colour": "red"}), 422, "unknown field 'colour'"),
        "wrong_content_type": (lambda: client.post("/v1/search", content=b"text=x", headers={"content-type": "text/plain"}),
                               415, "application/json"),
        "empty_query": (lambda: client.post("/v1/search", json={"k": 3}), 422, "needs text, image or both"),
        "long_text": (lambda: client.post("/v1/search", json={"text": "x" * 501}), 413, "max_text_chars"),
        "body_too_big": (lambda: client.post("/v1/search", content=b"{" + b" " * 4_000_001 + b"}",
                                             headers={"content-type": "application/json"}), 413, "max_body_bytes"),
        "bad_modality": (lambda: client.post("/v1/search", json={"text": "x", "modality": "audio"}), 422, "modality"),
        "bad_filter": (lambda: client.post("/v1/search", json={"text": "x", "filter": {"a'b": 1}}), 422, "filter key"),
        "truncated_json": (lambda: client.post("/v1/search", content=b'{"text": "x"', headers={"content-type": "application/json"}),
                           422, "JSON"),
        "upload_not_image": (lambda: client.post("/v1/search/image", files={"file": ("x.png", b"nope", "image/png")}),
                             400, "not a readable image"),
    }
    send, status, message = expect[case]
    r = send()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message.lower() in err["message"].lower(), err
    assert err["code"]
    assert_alive(client)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, "PNG")  # 4M pixels in a few KB
    return buf.getvalue()


def test_bad_document_is_refused_whole_and_nothing_is_lost(served):
    client, _ = served
    before = client.get("/v1/index").json()["documents"]
    r = client.post("/v1/documents", json={"documents": [{"id": "ok-1", "text": "fine"},
                                                         {"id": "bad-1", "image": base64.b64encode(b"junk").decode()}]})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    assert client.get("/v1/index").json()["documents"] == before
    assert client.get("/v1/documents/ok-1").status_code == 404
    assert client.get("/v1/documents/t1").status_code == 200


def batch_size_totals(client) -> tuple[float, float]:
    lines = [line.split() for line in client.get("/metrics").text.splitlines() if line.startswith("umr_batch_size_")]
    got = {name: float(value) for name, *_, value in lines}
    return got["umr_batch_size_sum"], got["umr_batch_size_count"]


def test_concurrent_queries_each_get_their_own_answer(served):
    """16 clients, 5 queries each, over real sockets: whatever batches form, batching never
    mixes answers up, and every forward is counted."""
    client, _ = served
    url = str(client.base_url)
    queries_before, _ = batch_size_totals(client)
    errors, results = [], {}

    def worker(i):
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                for j in range(5):
                    r = c.post("/v1/search", json={"text": f"document number {i}", "k": 1})
                    assert r.status_code == 200
                    results[(i, j)] = r.json()["results"][0]["id"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 80
    # Each query's own document (the same text, cosine 1) comes back to it.
    assert all(results[(i, j)] == f"t{i}" for i in range(16) for j in range(5)), results
    queries, _ = batch_size_totals(client)
    assert queries - queries_before == 80


def test_queries_that_arrive_during_a_forward_share_the_next_one(tmp_path, tiny):
    """Deterministic, not timed: the first query's forward is held while 15 more arrive over
    HTTP; they can only queue, and the batcher hands all 15 to one forward."""
    from umr.demo import BackgroundServer
    from umr.retrieval.engine import Engine
    from umr.retrieval.indexing.pipeline import build_index
    from umr.server.app import create_app

    from conftest import write_jsonl

    records = [{"id": f"t{i}", "text": f"document number {i}"} for i in range(16)]
    build_index(write_jsonl(tmp_path / "c.jsonl", records), tiny, tmp_path / "idx", progress=False)
    engine = Engine.open(tmp_path / "idx")
    sizes, first_started, release = [], threading.Event(), threading.Event()
    forward = engine.embed

    def held_first(prepared):
        sizes.append(len(prepared))
        if len(sizes) == 1:
            first_started.set()
            assert release.wait(30)
        return forward(prepared)

    engine.embed = held_first  # the real forward, the first call held at its start
    app = create_app(engine, ServerSettings(batch_max_size=32, batch_max_wait_ms=5))
    answers, errors = {}, []

    def ask(i):
        try:
            r = httpx.post(f"{url}/v1/search", json={"text": f"document number {i}", "k": 1}, timeout=60)
            answers[i] = r.json()["results"][0]["id"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    try:
        with BackgroundServer(app) as srv:
            url = srv.url
            threads = [threading.Thread(target=ask, args=(0,))]
            threads[0].start()
            assert first_started.wait(30)
            threads += [threading.Thread(target=ask, args=(i,)) for i in range(1, 16)]
            for t in threads[1:]:
                t.start()
            queue = app.state.umr.batcher.queue
            for _ in range(600):  # bounded: 30 s at most
                if queue.qsize() == 15:
                    break
                threading.Event().wait(0.05)
            assert queue.qsize() == 15
            release.set()
            for t in threads:
                t.join(timeout=60)
    finally:
        release.set()
        engine.close()
    assert not errors and answers == {i: f"t{i}" for i in range(16)}
    assert sizes == [1, 15], sizes
