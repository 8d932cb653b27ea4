"""lit-base over a fixed Flickr8k subset, built with the CLI, served by uvicorn, queried over HTTP."""
import base64
import json
from pathlib import Path

import httpx
import pytest

from conftest import cli_in_process, run_cli, write_jsonl
from umr.retrieval.engine import Engine
from umr.server.app import create_app
from umr.demo import BackgroundServer

N_IMAGES = 100  # the first 100 test images of the fixed split; chance of top-5 is 5/100


@pytest.fixture(scope="module")
def flickr_index(tmp_path_factory, flickr, flickr_test):
    names, caps = flickr_test
    tmp = tmp_path_factory.mktemp("e2e")
    records = [{"id": n, "image": str(flickr / "images" / n), "metadata": {"source": "flickr8k"}} for n in names[:N_IMAGES]]
    records += [{"id": f"{n}#caption", "text": caps[n][1]} for n in names[:N_IMAGES]]
    corpus = write_jsonl(tmp / "corpus.jsonl", records)
    r = run_cli("index", "build", corpus, "--encoder", "lit-base", "--out", tmp / "idx", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"indexed {2 * N_IMAGES} items" in r.stdout
    return tmp / "idx", names[:N_IMAGES], caps


@pytest.mark.slow
def test_captions_find_their_image_over_http(flickr_index):
    idx, names, caps = flickr_index
    engine = Engine.open(idx)
    with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        queries = [{"text": caps[n][0], "k": 5, "modality": "image"} for n in names]
        hits = 0
        for i in range(0, len(queries), 32):
            r = c.post("/v1/search/batch", json={"queries": queries[i : i + 32]})
            assert r.status_code == 200
            for n, res in zip(names[i : i + 32], r.json()["results"]):
                assert all(h["modality"] == "image" for h in res)
                hits += n in [h["id"] for h in res]
        rate = hits / len(names)
        assert rate >= 0.45, f"text->image hit@5 {rate:.2f} (chance 0.05)"
        # image -> text: a photo's own caption (held in the index) ranks in its top 5 well above chance
        img_hits = 0
        for n in names[:40]:
            b64 = base64.b64encode(Path(engine.get(n).image).read_bytes()).decode()
            res = c.post("/v1/search", json={"image": b64, "k": 5, "modality": "text"}).json()["results"]
            img_hits += f"{n}#caption" in [h["id"] for h in res]
        assert img_hits / 40 >= 0.3, f"image->text hit@5 {img_hits / 40:.2f} (chance 0.05)"
    engine.close()


@pytest.mark.slow
def test_cli_search_info_add_delete(flickr_index, tmp_path):
    """Two real command-line processes, then the same commands in this process (the encoder
    loaded once, not per command)."""
    idx, names, caps = flickr_index
    r = run_cli("search", idx, caps[names[0]][0], "-k", "5", "--modality", "image", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 5 and all(h["modality"] == "image" for h in hits)
    r = run_cli("search", idx, "--image", idx.parent / "missing.jpg")
    assert r.returncode == 2 and r.stderr.startswith("umr: error: image file not found")
    r = cli_in_process("search", idx, "a dog", "--filter", "source=flickr8k", "-k", "3")
    assert r.returncode == 0 and r.stdout.count("(image)") == 3
    r = cli_in_process("index", "info", idx, "--json")
    info = json.loads(r.stdout)
    assert info["documents"] == 2 * len(names) and info["segments"][0]["index"]["kind"] == "flat"
    # Where search runs, for the machine at hand (no GPU here or in CI): the CPU, and why.
    assert info["search"]["search_device"] == "cpu" and info["search"]["faiss_gpu"] is False
    assert info["segments"][0]["search_runs_on"] == "CPU (torch matrix product + top-k)"
    assert "search runs on: cpu (faiss " in cli_in_process("index", "info", idx).stdout
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"id": "extra-1", "text": "a completely new caption about kites"}])
    r = cli_in_process("index", "add", idx, extra, "--no-progress")
    assert r.returncode == 0 and "added 1 items" in r.stdout
    r = cli_in_process("search", idx, "kites", "-k", "1", "--modality", "text", "--json")
    assert json.loads(r.stdout)[0]["id"] == "extra-1"
    r = cli_in_process("index", "delete", idx, "extra-1", "nope")
    assert r.returncode == 1 and "deleted 1 documents; not found: nope" in r.stdout
    r = cli_in_process("search", idx, "kites", "-k", "1", "--modality", "text", "--json")
    assert json.loads(r.stdout)[0]["id"] != "extra-1"
    r = cli_in_process("search", idx, "x", "--encoder", "tiny-clip")
    assert r.returncode == 2 and "was built with encoder lit-base" in r.stderr and "--encoder lit-base" in r.stderr
