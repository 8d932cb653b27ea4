"""The cross-encoder re-ranker and re-ranker distillation, on the bundled sample photos."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_in_process

SAMPLE = ROOT / "umr" / "sample"


@pytest.fixture(scope="module")
def sample_mbeir(tmp_path_factory):
    """The sample corpus as M-BEIR: a pool of its photos and captions, text->image queries."""
    root = tmp_path_factory.mktemp("mbeir-sample")
    (root / "mbeir" / "cand_pool").mkdir(parents=True)
    (root / "mbeir" / "query").mkdir()
    recs = [json.loads(x) for x in (SAMPLE / "corpus.jsonl").read_text().splitlines()]
    photos = [r for r in recs if r.get("image") and not r.get("text")]
    captions = {r["id"].removesuffix("-caption"): r["text"] for r in recs if r["id"].endswith("-caption")}
    pool, queries = [], []
    for i, r in enumerate(photos):
        pool.append({"did": f"1:{i}", "txt": None, "img_path": str(SAMPLE / r["image"]), "modality": "image"})
        if r["id"] in captions:
            queries.append({"qid": f"1:{100 + i}", "query_txt": captions[r["id"]], "query_img_path": None,
                            "query_modality": "text", "pos_cand_list": [f"1:{i}"], "task_id": 0})
    def write(p, rows):
        p.write_text("".join(json.dumps(x) + "\n" for x in rows))
        return p

    return (write(root / "mbeir" / "cand_pool" / "s_train_cand_pool.jsonl", pool),
            write(root / "mbeir" / "query" / "s_task0_train.jsonl", queries), root)


@pytest.mark.slow
def test_reranker_trains_saves_reloads_and_scores_teacher_lists(sample_mbeir, lit):
    pool, queries, root = sample_mbeir
    neg = root / "neg.jsonl"
    r = cli_in_process("mine", "--encoder", "lit-base", "--queries", queries, "--pool", pool, "--out", neg,
                       "--keep", "3", "--guard", "none")
    assert r.returncode == 0, r.stderr
    rr = root / "rr"
    r = cli_in_process("reranker", "train", "--queries", neg, "--pool", pool, "--out", rr, "--epochs", "6",
                       "--batch-size", "8", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert (rr / "umr_reranker.json").exists() and (rr / "reranker.safetensors").exists()
    from umr.retrieval.corpus.mbeir import read_pool, read_queries
    from umr.retrieval.rerank.reranker import LitReranker

    items = read_pool(pool)
    q = read_queries(queries)[0]
    a = LitReranker.load(rr)
    cands = [items[d] for d in sorted(items)]
    p1 = a.score(q.item, cands)
    p2 = LitReranker.load(rr).score(q.item, cands)
    assert np.allclose(p1, p2) and ((p1 > 0) & (p1 < 1)).all()
    # The scorer reads token states, not only pooled vectors: permuting a caption's words (same
    # bag of words, nearly the same mean-pooled state) changes its score.
    from umr.retrieval.items import Item

    words = q.item.text.split()
    shuffled = Item(None, " ".join(words[::-1]))
    assert not np.allclose(a.score(shuffled, cands[:3]), a.score(q.item, cands[:3]), atol=1e-4)

    # Retrieve-then-rerank, from the CLI and over HTTP.
    idx = root / "idx"
    r = cli_in_process("index", "build", pool, "--out", idx, "--encoder", "lit-base")
    assert r.returncode == 0, r.stderr
    r = cli_in_process("search", idx, q.item.text, "-k", "3", "--reranker", rr, "--rerank", "6", "--rerank-weight", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert h["score"] == pytest.approx(h["rerank"]["cosine"] + 0.5 * h["rerank"]["p_yes"], abs=1e-5)
    r = cli_in_process("search", idx, "x", "--rerank", "6")
    assert r.returncode == 2 and "--reranker" in r.stderr
    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.demo import BackgroundServer
    import httpx

    eng = Engine.open(idx)
    eng.use_reranker(a, 6, 0.5)
    with BackgroundServer(create_app(eng)) as srv:
        body = httpx.post(srv.url + "/v1/search", json={"text": q.item.text, "k": 3}, timeout=60).json()
        image = httpx.post(srv.url + "/v1/search/image", files={"file": open(SAMPLE / "cat.jpg", "rb")},
                           data={"k": "2"}, timeout=60)
    eng.close()
    assert [h["id"] for h in body["results"]] == [h["id"] for h in hits]
    assert all(h["rerank"]["p_yes"] > 0 for h in body["results"])
    assert image.status_code == 200 and all(h["rerank"] for h in image.json()["results"])

    lists = root / "lists.jsonl"
    r = cli_in_process("reranker", "score", "--reranker", rr, "--encoder", "lit-base", "--queries", queries, "--pool", pool,
                       "--out", lists, "--top", "5", "--fraction", "1", "--weight", "0.5")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in lists.read_text().splitlines()]
    assert len(recs) == len(read_queries(queries))
    for rec in recs:
        tl = rec["teacher_list"]
        assert len(tl) == 5
        assert all(abs(t["teacher"] - (t["cos"] + 0.5 * t["p_yes"])) < 1e-4 for t in tl)
        assert [t["teacher"] for t in tl] == sorted((t["teacher"] for t in tl), reverse=True)

    # A distillation stage reads the lists; KL pulls the student toward the teacher's order.
    recipe = root / "distill.yaml"
    recipe.write_text(f"""
encoder: lit-base
out: {root / 'run'}
stages:
  - name: distill
    data: {{queries: {lists}, pool: {pool}}}
    loss: kl
    epochs: 20
    batch_size: 4
    lr: 1e-3
    schedule: constant
""")
    r = cli_in_process("train", recipe)
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (root / "run" / "01-distill" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    recipe.write_text(recipe.read_text().replace("loss: kl", "loss: margin-mse"))
    r = cli_in_process("train", recipe)
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (root / "run" / "01-distill" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]


def test_list_losses_train_a_student_toward_its_teacher():
    """KL and Margin-MSE stages on synthetic features: the student's ranking moves to the teacher's."""
    from umr.retrieval.encoders import load_encoder
    from umr.training.contrastive import ContrastiveConfig, train_examples
    from umr.training.examples import Example, FeatureBank

    g = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(40, 384, generator=g), dim=1)
    img = torch.rand(60, 1280, generator=g)
    bank = FeatureBank.from_features(txt, img)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(40):
        cands = 40 + rng.choice(60, 8, replace=False)
        examples.append(Example(np.array([i]), np.array([cands[0]]), np.array([], dtype=np.int64), cands,
                                np.linspace(2.0, 0.0, 8).astype(np.float32)))  # the teacher's order: as listed
    for loss in ("kl", "margin-mse"):
        enc = load_encoder("lit-init:32:0", cache=False)

        def agreement():
            with torch.no_grad():
                q = bank.embed(enc.heads, np.arange(40))
                hits = []
                for r, ex in enumerate(examples):
                    c = bank.embed(enc.heads, ex.teacher_items)
                    hits.append(float(torch.argmax(c @ q[r]) == 0))
                return np.mean(hits)

        before = agreement()
        train_examples(enc, bank, examples, ContrastiveConfig(epochs=60, batch_size=8, lr=3e-3, loss=loss,
                                                              schedule="constant", weight_decay=0.0))
        assert agreement() > max(0.6, before + 0.3), loss
