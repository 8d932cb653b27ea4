"""The command line as a user meets it: one-line errors for what they got wrong, a traceback and
a request for a report for what umr got wrong, typed filters, progress, logs with request ids,
and the figures `umr eval --plot` draws."""
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, cli_in_process, run_cli, write_jsonl
from umr.plots import COLOURS


def colour_pixels(png, hex_colour: str, tolerance: int = 12) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= tolerance).sum())


@pytest.fixture(scope="module")
def text_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    records = [{"id": f"d{i}", "text": f"document {i} about thing {i % 7}",
                "metadata": {"year": 2000 + i % 3, "name": str(2000 + i % 3), "draft": i % 2 == 0}} for i in range(60)]
    corpus = write_jsonl(tmp / "c.jsonl", records)
    r = run_cli("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp / "idx", "--no-progress")
    assert r.returncode == 0, r.stderr
    return tmp


@pytest.mark.parametrize("args, message", [
    (["index", "build", "c.jsonl", "--out", "o", "--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["search", "idx", "q", "-k", "-1"], "argument -k: -1 is out of range"),
    (["serve", "idx", "--port", "99999"], "ports are 0 (pick a free one) to 65535"),
    (["search", "idx", "q", "--device", "cuda"], "--device cuda: torch sees no CUDA device on this machine"),
    (["index", "build", "c.jsonl", "--out", "o", "--device", "tpu"], "unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
    (["train", "--pairs", "p.csv", "--out", "o", "--lr", "0"], "argument --lr: 0 is out of range"),
    (["eval", "--beir", "b", "--encoder", "lit-init:x"], "malformed encoder spec 'lit-init:x': the form is lit-init[:DIM[:SEED]]"),
    (["eval", "--beir", "b", "--encoder", "tiny-clip:a"], "the form is tiny-clip[:SEED]"),
    (["eval", "--beir", "b", "--encoder", "nonsense"], "unknown encoder 'nonsense'"),
    (["eval", "--beir", "b", "--encoder", "tiny-clip", "--plot", "x.svg"], "--plot writes a PNG"),
    (["eval", "--mbeir", "m", "--encoder", "tiny-clip", "--task", "zero"], "--task takes task ids separated by commas"),
    (["mine", "--encoder", "e", "--queries", "q", "--pool", "p", "--out", "o", "--guard", "2"], "argument --guard: 2 is out of range"),
])
def test_impossible_arguments_get_one_line(tmp_path, args, message):
    r = cli_in_process(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tmp_path):
    """An exception umr did not raise on purpose is not dressed up as a user error."""
    code = ("import sys, umr.cli as c, umr.cli.serving as s\n"
            "def broken(a): return max([])\n"  # the kind of message the old catch-all printed as if it were advice
            "s.cmd_demo = broken\n"
            "sys.exit(c.main(['demo']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 70
    assert "Traceback (most recent call last)" in r.stderr and "max() arg is an empty sequence" in r.stderr
    assert "this is a bug in umr" in r.stderr and "report it" in r.stderr
    # A file that is not there stays a one-line error: the user's to fix.
    r = run_cli("index", "info", tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_filters_from_the_command_line_are_typed(text_index):
    idx = text_index / "idx"

    def ids(*filters):
        args = [a for f in filters for a in ("--filter", f)]
        r = cli_in_process("search", idx, "document", "-k", "60", "--json", *args)
        assert r.returncode == 0, r.stderr
        return {h["id"] for h in json.loads(r.stdout)}

    numbers = ids("year=2001")
    assert numbers == {f"d{i}" for i in range(60) if i % 3 == 1}  # the number 2001, not the text
    assert ids('name="2001"') == numbers  # quotes: the string "2001"
    assert ids("name=2001") == set()  # a number never equals the string "2001"
    assert ids("draft=true", "year=2000") == {f"d{i}" for i in range(60) if i % 2 == 0 and i % 3 == 0}
    r = run_cli("search", idx, "document", "--filter", "year")  # as a user's shell runs it
    assert r.returncode == 2 and "--filter takes KEY=VALUE" in r.stderr


def test_mine_shows_progress(tmp_path, tiny):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"did": f"c{i}", "txt": f"caption number {i}", "modality": "text"}
                                                  for i in range(40)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"qid": f"q{i}", "query_txt": f"caption number {i}",
                                                   "pos_cand_list": [f"c{i}"], "task_id": 0} for i in range(20)])
    r = run_cli("mine", "--encoder", "tiny-clip", "--queries", queries, "--pool", pool, "--out", tmp_path / "neg.jsonl",
                "--top", "10")
    assert r.returncode == 0, r.stderr
    assert "embedding the pool" in r.stderr and "40/40" in r.stderr
    assert "searching task 0" in r.stderr and "20/20" in r.stderr
    assert len((tmp_path / "neg.jsonl").read_text().splitlines()) == 20


def test_serve_logs_json_lines_with_request_ids(text_index):
    from umr.demo import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "umr.cli", "serve", text_index / "idx", "--port", str(port),
                             "--read-only", "--log-level", "info", "--log-format", "json"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "document 3", "k": 2},
                       headers={"X-Request-ID": "abc-123"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "x", "k": 0}, timeout=30)
        assert bad.status_code == 422 and len(bad.headers["x-request-id"]) == 16  # a new id when none is given
        time.sleep(0.5)
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines, err[-2000:]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("request_id") == "abc-123"]
    assert any(line["path"] == "/v1/search" and line["status"] == 200 and line["ms"] > 0 for line in mine), lines
    assert any(line.get("request_id") == bad.headers["x-request-id"] and line["status"] == 422 for line in lines)
    assert any(line["logger"] == "umr.index" and "opened" in line["message"] for line in lines)


def test_eval_plot_draws_one_curve_per_encoder(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"document {i} about thing {i % 7}"}
                                        for i in range(150)])
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"document {i}"} for i in range(30)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t2\nq{i}\td{(i + 7) % 150}\t1\n" for i in range(30)))
    out = tmp_path / "curves.png"
    r = run_cli("eval", "--beir", beir, "--encoder", "tiny-clip", "--encoder", "tiny-clip:1", "--plot", out, "--json")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["encoder"] for x in results] == ["tiny-clip", "tiny-clip:1"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert colour_pixels(out, COLOURS[0]) > 150 and colour_pixels(out, COLOURS[1]) > 150  # both lines drawn


def test_curves_are_the_metrics_at_every_k(tmp_path):
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.evaluation.benchmarks import evaluate_beir

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "text": f"note {i} on topic {i % 5}"} for i in range(120)])
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"topic {i % 5}"} for i in range(20)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{j}\t1\n" for i in range(20) for j in range(i % 5, 120, 25)))
    res = evaluate_beir(load_encoder("tiny-clip"), beir, curves=True)["tasks"]["beir"]
    c = res["curve"]
    assert c["k"] == list(range(1, 101))
    assert all(a <= b + 1e-12 for a, b in zip(c["recall"], c["recall"][1:]))  # recall only grows with k
    assert all(r <= h + 1e-12 for r, h in zip(c["recall"], c["hit_rate"]))  # several relevant: recall <= hit rate
    for k in (1, 5, 10, 100):
        assert c["recall"][k - 1] == pytest.approx(res[f"recall@{k}"]) and c["hit_rate"][k - 1] == pytest.approx(res[f"hit_rate@{k}"])


def test_a_closed_pipe_ends_quietly_and_the_version_is_printed(text_index):
    """`umr search ... | head` as a shell runs it, the reader gone before umr writes (`true`
    reads nothing): no "Broken pipe" error, the exit of a tool stopped by the closed pipe;
    `umr --version` names the release."""
    from umr import __version__

    proc = subprocess.run(f'"{sys.executable}" -m umr.cli search "{text_index / "idx"}" document -k 60 | true; '
                          'exit ${PIPESTATUS[0]}', shell=True, executable="/bin/bash", capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
    r = cli_in_process("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"umr {__version__}"
