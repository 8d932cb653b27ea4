"""`umr index build --ray`: a Ray cluster on 127.0.0.1, started by the test, builds the same index
as one process does (ids, vectors, rejections, search results), and a build killed midway
encodes only its unfinished shards when run again."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli, write_jsonl
from umr.index import IndexStore
from umr.retrieval.engine import Engine, Query
from umr.retrieval.indexing.pipeline import build_index

pytestmark = pytest.mark.slow
N_PHOTOS = 72
SHARD = 8  # 11 shards: the kill after 2 leaves most of them to the rerun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Token authentication on, as Ray wants it: the cluster and every client share the token.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster (2 CPUs) on 127.0.0.1: its address, for `--ray ADDRESS`."""
    port = free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    tmp = tempfile.mkdtemp(prefix="umr-ray-", dir="/tmp")  # short: Ray's sockets live under it
    env = dict(os.environ, **RAY_ENV)
    started = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                              f"--temp-dir={tmp}"], capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flickr, flickr_test):
    """Real Flickr8k photos, some with a caption (image+text), a few caption-only texts, one
    photo that is not an image, one missing file and one repeated id: every kind of record a
    build must treat the same way, spread over several shards."""
    names, captions = flickr_test
    tmp = tmp_path_factory.mktemp("ray-corpus")
    recs = []
    for n, name in enumerate(names[:N_PHOTOS]):
        rec = {"id": f"photo/{n}", "image": str(flickr / "images" / name), "metadata": {"n": n}}
        if n % 3 == 0:
            rec["text"] = captions[name][0]
        recs.append(rec)
        if n % 10 == 5:
            recs.append({"id": f"caption/{n}", "text": captions[name][1]})
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    recs.insert(20, {"id": "broken", "image": str(broken)})
    recs.insert(40, {"id": "missing", "image": str(tmp / "nowhere.jpg")})
    recs.append({"id": "photo/3", "text": "a second record with an id already used"})
    return write_jsonl(tmp / "corpus.jsonl", recs), names, captions


def stored(path):
    store = IndexStore.open(path, mode="read")
    try:
        docs = {d.id: d for d in store.docs.iter_docs()}
        vecs = {}
        for doc_id in docs:
            _, seg, row = store.docs.get(doc_id)
            vecs[doc_id] = store.docs.vectors_at(seg, np.array([row]))[0]
        return docs, vecs, store.manifest["build"]["report"]
    finally:
        store.close()


def test_ray_build_matches_one_process_and_resumes_by_shard(cluster, corpus, lit, tmp_path):
    path, names, captions = corpus
    single = tmp_path / "single"
    build_index(path, lit, single, progress=False)

    # A Ray build, killed once its first shards are on disk.
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "umr.cli", "index", "build", str(path), "--out", str(out), "--encoder", "lit-base",
           "--ray", cluster, "--shard-size", str(SHARD), "--batch-size", "8", "--json"]
    env = dict(os.environ, **RAY_ENV)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    shards = out / "ray-shards"
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.exists() and len(list(shards.glob("shard-*"))) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    total = -(-sum(1 for _ in open(path)) // SHARD)
    done_before = len(list(shards.glob("shard-*")))
    assert 2 <= done_before < total

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["ray"]["shards"] == total
    assert report["ray"]["shards_reused"] == done_before  # the killed run's shards are not encoded again
    assert report["ray"]["shards_encoded"] == total - done_before
    assert report["ray"]["address"].endswith(cluster.split(":")[1])
    assert not shards.exists()  # merged into the index, then removed

    docs_1, vecs_1, rep_1 = stored(single)
    docs_r, vecs_r, rep_r = stored(out)
    assert sorted(docs_r) == sorted(docs_1) and len(docs_1) == report["indexed"]
    assert {r["id"]: r["reason"] for r in rep_r["rejections"]} == {r["id"]: r["reason"] for r in rep_1["rejections"]}
    assert {"broken", "missing", "photo/3"} <= {r["id"] for r in rep_r["rejections"]}
    assert docs_r["photo/3"].modality == "image,text"  # the first record with an id wins, as in one process
    for doc_id, doc in docs_1.items():
        assert (docs_r[doc_id].text, docs_r[doc_id].image, docs_r[doc_id].metadata) == (doc.text, doc.image, doc.metadata)
        assert np.allclose(vecs_r[doc_id], vecs_1[doc_id], atol=1e-5), doc_id

    one, many = Engine.open(single, lit, mode="read"), Engine.open(out, lit, mode="read")
    try:
        queries = [Query(captions[names[n]][2]) for n in range(0, N_PHOTOS, 9)]
        for a, b in zip(one.search(queries, 5), many.search(queries, 5)):
            assert [h.doc.id for h in a] == [h.doc.id for h in b]
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    finally:
        one.close()
        many.close()


def test_ray_flag_errors_are_one_line(corpus, tmp_path):
    path = corpus[0]
    r = run_cli("index", "build", path, "--out", tmp_path / "x", "--ray", "127.0.0.1:1", "--encoder", "tiny-clip")
    assert r.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    r = run_cli("index", "build", path, "--out", tmp_path / "y", "--ray", "--shard-size", "0")
    assert r.returncode == 2 and "--shard-size" in r.stderr


@pytest.mark.parametrize("kind", ["image", "text"])
def test_ray_build_of_a_corpus_with_one_modality_keeps_every_record(cluster, flickr, flickr_test, lit, kind, tmp_path):
    # Every block of such a corpus lacks the other field altogether, which Ray Data hands over as
    # a column of NaN floats: every record came back rejected before.
    names, captions = flickr_test
    recs = [{"id": f"{kind}/{n}", kind: str(flickr / "images" / name) if kind == "image" else captions[name][0]}
            for n, name in enumerate(names[:10])]
    path = write_jsonl(tmp_path / "corpus.jsonl", recs)
    single, out = tmp_path / "single", tmp_path / "ray"
    build_index(path, lit, single, progress=False)
    r = subprocess.run([sys.executable, "-m", "umr.cli", "index", "build", str(path), "--out", str(out), "--encoder",
                        "lit-base", "--ray", cluster, "--shard-size", "8", "--batch-size", "4", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, **RAY_ENV))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["indexed"] == len(recs)
    docs_1, vecs_1, _ = stored(single)
    docs_r, vecs_r, rep_r = stored(out)
    assert sorted(docs_r) == sorted(docs_1) and len(docs_r) == len(recs) and not rep_r["rejections"]
    for doc_id in docs_1:
        assert docs_r[doc_id].modality == kind
        assert np.allclose(vecs_r[doc_id], vecs_1[doc_id], atol=1e-5), doc_id
