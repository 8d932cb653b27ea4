import csv
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests share one fresh feature cache per run (the CLI subprocesses too): nothing leaks in from
# the user's own ~/.cache/umr, and a test that needs a cold cache sets UMR_CACHE_DIR itself.
if "UMR_TEST_KEEP_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["UMR_CACHE_DIR"] = tempfile.mkdtemp(prefix="umr-test-cache-")
    atexit.register(shutil.rmtree, os.environ["UMR_CACHE_DIR"], True)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FLICKR = DATA / "flickr8k-1k"


def require_data(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the repository expects ../shared/data beside it)")
    return path


@pytest.fixture(scope="session")
def flickr() -> Path:
    return require_data(FLICKR)


@pytest.fixture(scope="session")
def flickr_test(flickr):
    """(test image names, {image: [captions]}) for the fixed split."""
    split = json.loads((flickr / "split.json").read_text())
    caps: dict[str, list[str]] = {}
    with open(flickr / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"])
    return split["test"], caps


@pytest.fixture(scope="session")
def tiny():
    from umr.retrieval.encoders import load_encoder

    return load_encoder("tiny-clip")


@pytest.fixture(scope="session")
def lit():
    from umr.retrieval.encoders import load_encoder

    return load_encoder("lit-base")


def flickr_captions(photos) -> dict[str, list[str]]:
    """The captions of these flickr8k-1k photos, in the file's order."""
    import csv

    wanted, caps = set(photos), {}
    with open(FLICKR / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            if row["image"] in wanted:
                caps.setdefault(row["image"], []).append(row["caption"])
    return caps


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def run_cli(*args, env=None, timeout=300):
    import subprocess

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "umr.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=e)


def cli_in_process(*args):
    """`umr ARGS` run by this process (encoders already loaded here are reused: no 7 s start),
    as (returncode, stdout, stderr) like run_cli's result; the logging main() configures for a
    command-line process is put back for pytest."""
    import io
    import logging
    import subprocess
    from contextlib import redirect_stderr, redirect_stdout

    from umr.cli import main

    root, umr_logger = logging.getLogger(), logging.getLogger("umr")
    handlers, root_level, umr_level = list(root.handlers), root.level, umr_logger.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own exit
                code = e.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        umr_logger.setLevel(umr_level)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def png_bytes(size=(40, 30), color="red") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def served_index(tmp: Path, encoder, records, settings=None, images=()):
    """An index of `records` (with `images`: (name, size, colour) PNGs beside them) built with
    `encoder`, served by uvicorn on 127.0.0.1: yields (base URL, engine)."""
    from PIL import Image

    from umr.retrieval.engine import Engine
    from umr.retrieval.indexing.pipeline import build_index
    from umr.server.app import create_app
    from umr.demo import BackgroundServer

    for name, size, colour in images:
        Image.new("RGB", size, colour).save(tmp / name)
    build_index(write_jsonl(tmp / "c.jsonl", records), encoder, tmp / "idx", progress=False)
    engine = Engine.open(tmp / "idx")
    try:
        with BackgroundServer(create_app(engine, settings)) as srv:
            yield srv.url, engine
    finally:
        engine.close()


def pytest_configure(config):
    # pytest puts the warning filters back around each test: the one retrieval/encoders/device_decode.py
    # sets for torchvision 0.29's notice on its image decoders (here, not in pyproject.toml, whose
    # every change keys a new 7 GB environment in scripts/venv.sh)
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
