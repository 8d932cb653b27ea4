"""`umr demo`: the main job on the embedded default, end to end on a bundled sample corpus.

Builds an index with lit-base, serves it with uvicorn on 127.0.0.1, sends text->image and
image->text queries over real HTTP and prints what comes back.
"""
from __future__ import annotations

import base64
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "sample"
# A few of the sample queries issue 9 measures (bench/zero_shot.py runs all 12).
TEXT_TO_PHOTO = {"a cat": "cat", "a cup of coffee": "coffee", "a flower": "flower", "old coins": "coins",
                 "a horse": "horse", "a rocket": "rocket", "a temple": "palace", "galaxies in the night sky": "hubble"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


class BackgroundServer:
    """uvicorn in a thread of this process, stopped cleanly; used by the demo, tests and benches."""

    def __init__(self, app, port: int = 0, trusted_proxies: list[str] | None = None):
        import uvicorn

        from umr.server.app import uvicorn_config

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn_config(app, trusted_proxies, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return self
            except urllib.error.HTTPError:  # up, and saying it is unhealthy
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start within 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_demo(out: str | None = None, port: int = 0) -> int:
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine
    from umr.retrieval.indexing.pipeline import build_index
    from umr.server.app import create_app

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="umr-demo-")
        out = str(Path(tmp.name) / "index")
    print(f"1. building an index of {SAMPLE / 'corpus.jsonl'} with lit-base into {out}")
    report = build_index(SAMPLE / "corpus.jsonl", load_encoder("lit-base"), out)
    print(f"   {report.indexed} items indexed, {report.rejected} bad records skipped")
    engine = Engine.open(out)
    with BackgroundServer(create_app(engine), port) as srv:
        print(f"2. serving on {srv.url} (try {srv.url}/docs)")
        print("3. text -> image over HTTP (POST /v1/search, modality image); * marks the photo the query names")
        for q, photo in TEXT_TO_PHOTO.items():
            r = post(srv.url + "/v1/search", {"text": q, "k": 3, "modality": "image"})
            print(f"   {q!r:28} -> " + ", ".join(f"{h['id']}{'*' if h['id'] == photo else ''} ({h['score']:.3f})"
                                                 for h in r["results"]))
        print("4. image -> text over HTTP (base64 image, modality text)")
        for name in ["rocket.jpg", "coffee.jpg", "horse.jpg"]:
            img = base64.b64encode((SAMPLE / name).read_bytes()).decode()
            r = post(srv.url + "/v1/search", {"image": img, "k": 2, "modality": "text"})
            print(f"   {name:28} -> " + " | ".join(f"{h['text']} ({h['score']:.3f})" for h in r["results"]))
        print("5. image+text query (fused), all modalities")
        img = base64.b64encode((SAMPLE / "cat.jpg").read_bytes()).decode()
        r = post(srv.url + "/v1/search", {"image": img, "text": "on the sofa", "k": 3})
        print("   cat.jpg + 'on the sofa'       -> " + ", ".join(f"{h['id']} ({h['modality']})" for h in r["results"]))
    engine.close()
    if tmp is not None:
        tmp.cleanup()
    print("done.")
    return 0
