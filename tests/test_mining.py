"""Hard-negative mining, hard negatives in the loss, and list distillation losses."""
import json

import numpy as np
import pytest
import torch

from conftest import cli_in_process, write_jsonl
from umr.retrieval.items import Item
from umr.retrieval.corpus.mbeir import MbeirQuery, read_pool, read_queries
from umr.training.losses import info_nce, listwise_kl, margin_mse
from umr.training.mining import MiningConfig, mine


def test_hard_negatives_raise_the_loss_unless_they_are_labelled_positives():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    c = q + 0.3 * torch.randn(4, 16)
    scale = torch.tensor(2.0)
    base = info_nce(q, c, scale, symmetric=False)
    hard = q + 0.2 * torch.randn(4, 16)  # closer to each query than its own positive
    with_hard = info_nce(q, c, scale, symmetric=False, negatives=hard)
    assert with_hard > base + 0.1
    # The same candidates marked as positives of their queries no longer count against them.
    same = torch.zeros(4, 8, dtype=torch.bool)
    same[torch.arange(4), 4 + torch.arange(4)] = True
    assert info_nce(q, c, scale, symmetric=False, same=same, negatives=hard) < base
    # The symmetric term still runs over the in-batch block only.
    sym = info_nce(q, c, scale, symmetric=True, negatives=hard)
    assert sym == pytest.approx(float((with_hard + info_nce(c, q, scale, symmetric=False)) / 2), rel=1e-5)


def test_list_distillation_losses_vanish_when_the_student_matches_the_teacher():
    torch.manual_seed(0)
    cos = torch.rand(3, 5) * 2 - 1
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False  # a shorter list, padded
    scale = torch.tensor(float(np.log(20.0)))
    assert float(listwise_kl(cos, 2 * cos, mask, scale)) == pytest.approx(0, abs=1e-6)
    assert float(margin_mse(cos, 2 * cos, mask)) == pytest.approx(0, abs=1e-9)
    flipped = 2 * -cos
    assert float(listwise_kl(cos, flipped, mask, scale)) > 0.1
    assert float(margin_mse(cos, flipped, mask)) > 0.1
    # Padding never leaks: garbage in padded slots changes nothing.
    noisy = (2 * cos).masked_fill(~mask, 99.0)
    assert float(listwise_kl(cos, noisy, mask, scale)) == pytest.approx(0, abs=1e-6)


@pytest.fixture()
def pool_and_queries(tmp_path):
    (tmp_path / "mbeir" / "cand_pool").mkdir(parents=True)
    (tmp_path / "mbeir" / "query").mkdir()
    texts = ["red dog on grass", "red dog on grass", "blue car in city", "a boat on a river",
             "green tree in a park", "small bird on a wire", "old house by the sea", "fast train at night"]
    pool = write_jsonl(tmp_path / "mbeir" / "cand_pool" / "x_train_cand_pool.jsonl",
                       [{"did": f"1:{i}", "txt": t, "img_path": None, "modality": "text"} for i, t in enumerate(texts)])
    queries = write_jsonl(tmp_path / "mbeir" / "query" / "x_task1_train.jsonl", [
        {"qid": "1:100", "query_txt": "red dog on grass", "query_img_path": None, "query_modality": "text",
         "pos_cand_list": ["1:0"], "neg_cand_list": [], "task_id": 1},
        {"qid": "1:101", "query_txt": "blue car in city", "query_img_path": None, "query_modality": "text",
         "pos_cand_list": ["1:2", "1:99"], "neg_cand_list": [], "task_id": 1}])
    return pool, queries


def test_mining_drops_positives_and_likely_false_negatives(tiny, pool_and_queries):
    pool, queries = pool_and_queries
    qs, items = read_queries(queries), read_pool(pool)
    records, stats = mine(tiny, qs, items, MiningConfig(top=8, keep=3, guard=0.95))
    by_q = {r["qid"]: r for r in records}
    assert "1:0" not in by_q["1:100"]["neg_cand_list"]  # the labelled positive
    assert "1:1" not in by_q["1:100"]["neg_cand_list"]  # the duplicate of the positive: a missing label
    assert len(by_q["1:100"]["neg_cand_list"]) == 3 and stats["dropped by the false-negative guard"] >= 1
    assert all(s <= 0.95 * by_q["1:100"]["pos_score"] + 1e-6 for s in by_q["1:100"]["neg_scores"])
    assert by_q["1:100"]["neg_scores"] == sorted(by_q["1:100"]["neg_scores"], reverse=True)
    assert by_q["1:101"]["pos_cand_list"] == ["1:2", "1:99"] and by_q["1:101"]["mined_by"] == tiny.fingerprint
    # Without the guard the duplicate is the hardest negative there is.
    unguarded, _ = mine(tiny, qs, items, MiningConfig(top=8, keep=3, guard=None))
    assert unguarded[0]["neg_cand_list"][0] == "1:1"
    # A rank window takes negatives from those ranks only.
    windowed, _ = mine(tiny, qs, items, MiningConfig(top=8, keep=None, guard=None, window=(2, 4)))
    full, _ = mine(tiny, qs, items, MiningConfig(top=8, keep=None, guard=None))
    assert windowed[0]["neg_cand_list"] == full[0]["neg_cand_list"][1:4]


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_umr_mine_cli(tiny, pool_and_queries, tmp_path):
    pool, queries = pool_and_queries
    out = tmp_path / "neg.jsonl"
    r = cli_in_process("mine", "--encoder", "tiny-clip", "--queries", queries, "--pool", pool, "--out", out, "--keep", "2")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(x["neg_cand_list"]) for x in lines] == [2, 2] and "4 negatives for 2 queries" in r.stdout
    assert read_queries(out)[0].negatives == lines[0]["neg_cand_list"]  # the output is itself M-BEIR query data
    r = cli_in_process("mine", "--encoder", "tiny-clip", "--queries", queries, "--pool", pool, "--out", out, "--window", "5:2")
    assert r.returncode == 2 and "--window" in r.stderr
    r = cli_in_process("mine", "--encoder", "tiny-clip", "--queries", pool, "--pool", pool, "--out", out)
    assert r.returncode == 2 and "qid" in r.stderr


def test_mbeir_examples_keep_negatives_and_teacher_lists(pool_and_queries):
    from umr.training.examples import FeatureBank, mbeir_examples

    pool = read_pool(pool_and_queries[0])
    q = MbeirQuery("1:5", Item("1:5", "red dog"), ["1:0", "1:77"], ["1:3", "1:404"], 1,
                   {"teacher_list": [{"did": "1:0", "teacher": 1.6}, {"did": "1:3", "teacher": 0.4}]})
    lost = MbeirQuery("1:6", Item("1:6", "nothing"), ["1:404"], [], 1, {})
    bank = FeatureBank()
    examples, stats = mbeir_examples([q, lost], pool, bank)
    assert len(examples) == 1 and stats["skipped (no positive in the pool)"] == 1
    ex = examples[0]
    assert len(ex.positives) == 1 and len(ex.negatives) == 1  # dids missing from the pool are dropped
    assert ex.teacher_scores.tolist() == pytest.approx([1.6, 0.4])
    assert bank.item(text="red dog on grass") == ex.positives[0] == ex.teacher_items[0]
    with pytest.raises(ValueError, match="no training query has a positive"):
        mbeir_examples([lost], pool, FeatureBank())


def test_instructions_are_prefixed_to_queries_only(tmp_path, pool_and_queries):
    from umr.retrieval.corpus.mbeir import Instructions
    from umr.training.examples import FeatureBank, mbeir_examples

    tsv = tmp_path / "query_instructions.tsv"
    tsv.write_text("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n"
                   "text\ttext\tx\t1\tFind a matching sentence.\tRetrieve a similar text.\n"
                   "image\ttext\tx\t1\tCaption this.\t\n")
    ins = Instructions(tsv)
    assert ins.pick("1", "text", "text") == "Find a matching sentence."
    assert ins.pick("1", "image", "text") == "Caption this." and ins.pick("2", "text", "text") is None
    assert ins.pick("1", "text", "text", np.random.default_rng(3)) in ("Find a matching sentence.", "Retrieve a similar text.")
    pool = read_pool(pool_and_queries[0])
    bank = FeatureBank()
    examples, _ = mbeir_examples(read_queries(pool_and_queries[1]), pool, bank, ins)
    texts = list(bank.texts)
    assert any(t.startswith(("Find a matching sentence. red dog", "Retrieve a similar text. red dog")) for t in texts)
    assert "red dog on grass" in texts  # the candidate itself carries no instruction
    with pytest.raises(ValueError, match="no instructions"):
        Instructions(write_jsonl(tmp_path / "empty.tsv", []))
