"""API keys with scopes, failed-attempt limits, and nothing of the server's disk revealed
(issue 11, part 3). Served by uvicorn on 127.0.0.1."""
import base64
import io
import json
import os
import stat
import time

import httpx
import pytest
from PIL import Image

from conftest import cli_in_process, run_cli, write_jsonl
from umr.retrieval.engine import Engine
from umr.retrieval.indexing.pipeline import build_index
from umr.server.app import create_app
from umr.server.keys import KeyRing
from umr.server.settings import ServerSettings
from umr.demo import BackgroundServer


def make_key(path, scope):
    r = cli_in_process("keys", "add", "--scope", scope, "--file", path)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("umr_") and len(key) > 40 and "only time" in r.stderr
    return key


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("keys")
    Image.new("RGB", (80, 60), "blue").save(tmp / "blue.png")
    records = [{"id": f"t{i}", "text": f"document number {i}"} for i in range(20)]
    records.append({"id": "photos/blue", "image": "blue.png"})
    build_index(write_jsonl(tmp / "c.jsonl", records), tiny, tmp / "idx", progress=False)
    return tmp


def test_key_file_holds_hashes_only_and_keys_are_shown_once(tmp_path):
    path = tmp_path / "keys.json"
    keys = {scope: make_key(path, scope) for scope in ("read", "write", "admin")}
    text = path.read_text()
    assert not any(k in text for k in keys.values())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring = KeyRing.load(path)
    assert {scope: ring.scope_of(k) for scope, k in keys.items()} == {"read": "read", "write": "write", "admin": "admin"}
    assert ring.scope_of(keys["read"] + "x") is None and ring.scope_of("") is None
    listed = cli_in_process("keys", "list", "--file", path)
    assert "read-1\tread" in listed.stdout and not any(k in listed.stdout for k in keys.values())
    assert cli_in_process("keys", "revoke", "read-1", "--file", path).returncode == 0
    assert KeyRing.load(path).scope_of(keys["read"]) is None
    bad = cli_in_process("keys", "revoke", "nobody", "--file", path)
    assert bad.returncode == 2 and "no key named 'nobody'" in bad.stderr
    path.write_text("{\"keys\": 3}")
    r = run_cli("serve", tmp_path, "--key-file", path)
    assert r.returncode == 2 and "not a umr key file" in r.stderr and "Traceback" not in r.stderr


def test_scopes_guard_reads_writes_and_admin(index, tmp_path):
    path = tmp_path / "keys.json"
    keys = {scope: make_key(path, scope) for scope in ("read", "write", "admin")}
    engine = Engine.open(index / "idx")
    settings = ServerSettings(keys=KeyRing.load(path))
    with BackgroundServer(create_app(engine, settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        def as_(scope):
            return {"Authorization": f"Bearer {keys[scope]}"} if scope else {}

        doc = {"documents": [{"id": "new-1", "text": "a new document"}]}
        assert c.post("/v1/documents", json=doc).status_code == 401
        assert c.post("/v1/documents", json=doc, headers=as_("read")).status_code == 403
        assert c.post("/v1/documents", json=doc, headers={"X-API-Key": keys["write"]}).status_code == 200
        assert c.delete("/v1/documents/new-1", headers=as_("read")).status_code == 403
        assert c.delete("/v1/documents/new-1", headers=as_("admin")).status_code == 200  # admin can write
        r = c.post("/v1/search", json={"text": "document number 3"})
        assert r.status_code == 401 and "scope 'read'" in r.json()["error"]["message"]
        assert c.post("/v1/search", json={"text": "document number 3"}, headers=as_("read")).status_code == 200
        assert c.get("/v1/index").status_code == 401 and c.get("/healthz").status_code == 200
        r = c.post("/v1/admin/encoder", json={"version": 1}, headers=as_("write"))
        assert r.status_code == 403 and "scope 'admin'" in r.json()["error"]["message"]
        assert c.post("/v1/admin/encoder", json={"version": 1}, headers=as_("admin")).json()["changed"] is False
    engine.close()


def test_public_reads_and_the_legacy_admin_key_still_guard_writes(index):
    engine = Engine.open(index / "idx")
    with BackgroundServer(create_app(engine, ServerSettings(admin_key="legacy-admin-key", public_read=True))) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/search", json={"text": "document number 3"}).status_code == 200
        assert c.get("/v1/documents/t3").status_code == 200
        assert c.post("/v1/documents", json={"documents": [{"id": "x", "text": "x"}]}).status_code == 401
        assert c.delete("/v1/documents/t3").status_code == 401
        assert c.get("/v1/documents/t3").status_code == 200
    engine.close()


def wait_for(pred, seconds=5.0) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < seconds, "not within the time allowed"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_wrong_keys_lock_out_their_client_only_and_forwarded_headers_are_not_believed(index, tmp_path):
    from umr.server.keys import add_key, revoke_key

    path = tmp_path / "keys.json"
    key = make_key(path, "write")
    admin = "a-person-chose-this-admin-key"
    engine = Engine.open(index / "idx", mode="read")
    settings = ServerSettings(keys=KeyRing.load(path), key_file=path, admin_key=admin, auth_max_failures=5,
                              auth_window_s=60, auth_lockout_s=2)

    def search(c, key=None, forwarded=None):
        headers = {**({"X-API-Key": key} if key else {}), **({"X-Forwarded-For": forwarded} if forwarded else {})}
        return c.post("/v1/search", json={"text": "x"}, headers=headers).status_code

    with BackgroundServer(create_app(engine, settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        # Each wrong key "from" another address: the header is not believed, the lockout comes.
        statuses = [search(c, f"guess-{i}", f"198.51.100.{i}") for i in range(8)]
        assert statuses[:4] == [401] * 4 and set(statuses[5:]) == {429}
        assert search(c, "guess-x", "203.0.113.9") == 429 and search(c) == 429  # no header gets out of it
        assert search(c, key) == 200  # a valid key is never locked out by another client's wrong ones
        r = c.post("/v1/admin/encoder", json={"version": 1}, headers={"X-API-Key": admin})
        assert r.status_code == 429  # the key a person chose is not even compared for a locked-out client
        time.sleep(2.2)
        assert c.post("/v1/admin/encoder", json={"version": 1}, headers={"X-API-Key": admin}).status_code == 200
        # The key file is watched: a revoked key stops, a new one starts, within seconds.
        revoke_key(path, "write-1")
        took = wait_for(lambda: search(c, key) == 401)
        new_key, _ = add_key(path, "read")
        took = max(took, wait_for(lambda: search(c, new_key) == 200))
        assert took < 3
        path.unlink()  # a key file that is gone leaves no file key valid: the server never falls open
        wait_for(lambda: search(c, new_key) == 401)
    with BackgroundServer(create_app(engine, settings), trusted_proxies=["127.0.0.1"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        # Behind a proxy the operator trusts, the forwarded address is the client's.
        assert [search(c, f"guess-{i}", "198.51.100.7") for i in range(6)][-1] == 429
        assert search(c, "guess", "198.51.100.8") == 401 and search(c, admin, "198.51.100.8") == 200
    engine.close()


def test_hits_carry_references_not_server_paths_and_images_are_served(index):
    engine = Engine.open(index / "idx")
    with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), "blue").save(buf, "PNG")
        hits = c.post("/v1/search", json={"image": base64.b64encode(buf.getvalue()).decode(), "k": 3}).json()["results"]
        assert hits[0]["id"] == "photos/blue" and hits[0]["image"] == "/v1/documents/photos%2Fblue/image"
        body = json.dumps(hits) + c.get("/v1/index").text + c.get("/v1/documents/photos/blue").text
        assert str(index) not in body and "/tmp" not in body
        full = c.get(hits[0]["image"])
        assert full.status_code == 200 and full.headers["content-type"] == "image/png"
        assert full.content == (index / "blue.png").read_bytes()
        thumb = c.get(hits[0]["image"], params={"size": 32})
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (32, 24)
        assert c.get(hits[0]["image"], params={"size": 5}).status_code == 422
        r = c.get("/v1/documents/t1/image")
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_image"
        assert c.get("/v1/documents/nope/image").status_code == 404
        uploaded = c.post("/v1/documents", json={"documents": [{"id": "up", "image": base64.b64encode(buf.getvalue()).decode()}]})
        assert uploaded.status_code == 200
        assert c.get("/v1/documents/up/image").content == buf.getvalue()
    engine.close()
