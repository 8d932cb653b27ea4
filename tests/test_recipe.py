"""Staged training recipes: parsing, stage chaining, resume, and continual distillation."""
import copy
import json

import pytest
import torch

from conftest import cli_in_process
from umr.training.recipe import RecipeError, load_recipe


def write(path, text):
    path.write_text(text)
    return path


def test_recipe_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"image": "a.jpg", "text": "x"}\n')
    r = write(tmp_path / "r.yaml", """
encoder: lit-init:32:0
out: runs/x
continual: {teacher: lit-base, weight: 0.5}
stages:
  - name: text
    data: {pairs: data/pairs.jsonl, split: data/split.json:train, kind: caption-caption}
    epochs: 2
  - name: images
    data: {pairs: data/pairs.jsonl}
    continual: {teacher: lit-init:32:0, weight: 2}
    lr: 1e-4
""")
    rec = load_recipe(r)
    assert rec.out == str(tmp_path / "runs" / "x")
    assert rec.stages[0].data.pairs == str(tmp_path / "data" / "pairs.jsonl")
    assert rec.stages[0].data.split == f"{tmp_path / 'data' / 'split.json'}:train"
    assert rec.stages[0].continual.teacher == "lit-base" and rec.stages[0].continual.weight == 0.5
    assert rec.stages[1].continual.weight == 2.0 and rec.stages[1].lr == 1e-4  # YAML reads 1e-4 as a string
    assert rec.stage_dir(1) == tmp_path / "runs" / "x" / "02-images"
    assert load_recipe(r, out=str(tmp_path / "elsewhere")).out == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("body, message", [
    ("stages: []\nout: o", "at least one stage"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, lerning_rate: 1}", "unknown key(s) lerning_rate"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: missing.jsonl}}", "stage 1 (a): data.pairs "),
    ("out: o\nstages:\n  - {name: a, data: {pairs: missing.jsonl}}", "missing.jsonl does not exist"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl, kind: triples}}", "data.kind must be one of image-caption, caption-caption"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, batch_size: 1}", "stage 1 (a): batch_size must be at least 2, got 1"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl, pears: 1}}", "unknown key(s) pears (allowed: caption_template"),
    ("out: o\nstages:\n  - {name: 'a b', data: {pairs: p.jsonl}}", "needs a `name` of letters"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, loss: triplet}", "loss must be one of"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, hard_negatives: 5}", "hard_negatives needs data.queries"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, loss: kl}", "loss kl needs data.queries"),
    ("out: o\nstages:\n  - {name: a, data: {queries: p.jsonl}}", "needs data.pool"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}}\n  - {name: a, data: {pairs: p.jsonl}}", "unique"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, continual: {weight: 1}}", "teacher"),
    ("out: o\nstages:\n  - {name: a, data: {pairs: p.jsonl}, epochs: many}", "stage 1 (a): epochs must be an integer, got 'many'"),
    ("out: [unclosed", "not valid YAML"),
])
def test_bad_recipes_name_the_problem(tmp_path, body, message):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path / "r.yaml", body))
    assert message in str(e.value)


def test_bad_recipe_is_a_one_line_cli_error(tmp_path):
    r = cli_in_process("train", write(tmp_path / "r.yaml", "out: o\nstages:\n  - {name: a, data: {pairs: nope.jsonl}}"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.jsonl does not exist" in r.stderr
    r = cli_in_process("train", tmp_path / "r.yaml", "--pairs", "x.csv")
    assert r.returncode == 2 and "not both" in r.stderr


def _features(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 1280, generator=g)
    txt = torch.nn.functional.normalize(torch.randn(2 * n, 384, generator=g), dim=1)
    return img, txt, torch.arange(2 * n) // 2  # two captions per image


def test_an_interrupted_stage_resumes_to_the_same_weights(tmp_path):
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.encoders.lit import LitEncoder
    from umr.training.contrastive import ContrastiveConfig, train_heads

    start = load_encoder("lit-init:32:1")
    cfg = ContrastiveConfig(epochs=6, batch_size=64, lr=1e-3, schedule="cosine", trainable="heads")
    feats = _features()
    whole = LitEncoder(copy.deepcopy(start.heads), "whole")
    full_history = train_heads(whole, *feats, cfg)

    class Crash(Exception):
        pass

    def crash_at_3(rec):
        if rec["epoch"] == 3:
            raise Crash

    first = LitEncoder(copy.deepcopy(start.heads), "interrupted")
    with pytest.raises(Crash):
        train_heads(first, *feats, cfg, crash_at_3, checkpoint=tmp_path)
    resumed = LitEncoder(copy.deepcopy(start.heads), "resumed")  # a fresh process starts from the stage's start
    history = train_heads(resumed, *feats, cfg, checkpoint=tmp_path)
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] == pytest.approx(full_history[-1]["loss"], rel=1e-4)
    for (name, a), b in zip(whole.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_trainable_and_temperature_settings_are_honoured():
    from umr.retrieval.encoders import load_encoder
    from umr.training.contrastive import ContrastiveConfig, train_heads

    enc = load_encoder("lit-init:32:2", cache=False)
    before = copy.deepcopy(enc.heads.state_dict())
    cfg = ContrastiveConfig(epochs=2, batch_size=64, trainable="text-head", temperature=0.1, learn_temperature=False,
                            kind="caption-caption", steps=3)
    history = train_heads(enc, *_features(), cfg)
    after = enc.heads.state_dict()
    assert history[-1]["step"] == 3  # steps caps the run before the two epochs end
    assert torch.equal(before["image_proj.weight"], after["image_proj.weight"])
    assert not torch.equal(before["text_proj.weight"], after["text_proj.weight"])
    assert float(after["logit_scale"].exp()) == pytest.approx(10.0)


@pytest.mark.slow
def test_recipe_runs_stages_in_order_and_reuses_finished_ones(flickr, tmp_path):
    split = flickr / "split.json"
    body = f"""
encoder: lit-init:64:3
out: run
stages:
  - name: text
    data: {{pairs: {flickr / 'captions.txt'}, split: {split}:train, kind: caption-caption}}
    epochs: 4
    trainable: text-head
  - name: images
    data: {{pairs: {flickr / 'captions.txt'}, split: {split}:train}}
    epochs: 6
    schedule: cosine
    continual: {{teacher: run/01-text, weight: 0.5}}
"""
    recipe = write(tmp_path / "r.yaml", body)
    r = cli_in_process("train", recipe, "--eval", flickr / "mbeir")
    assert r.returncode == 0, r.stderr
    s1 = json.loads((tmp_path / "run" / "01-text" / "stage.json").read_text())
    s2 = json.loads((tmp_path / "run" / "02-images" / "stage.json").read_text())
    assert s1["status"] == s2["status"] == "done"
    assert s2["start"] == str(tmp_path / "run" / "01-text") and s2["start_fingerprint"] == s1["fingerprint"]
    assert s2["eval"]["tasks"]["task0"]["hit_rate@5"] > s1["eval"]["tasks"]["task0"]["hit_rate@5"]
    assert s2["eval"]["tasks"]["task0"]["hit_rate@5"] > 0.2  # chance: 0.025
    assert not (tmp_path / "run" / "02-images" / "checkpoint.safetensors").exists()
    prov = json.loads((tmp_path / "run" / "02-images" / "umr_encoder.json").read_text())["provenance"]
    assert prov["data"]["continual"] == {"teacher": str(tmp_path / "run" / "01-text"), "weight": 0.5}

    # The reruns run in this process (the towers already loaded): the first run was the real CLI.
    r = cli_in_process("train", recipe)  # nothing changed: both stages are reused
    assert r.returncode == 0 and r.stderr.count("already done") == 2
    write(recipe, body.replace("epochs: 6", "epochs: 5"))
    r = cli_in_process("train", recipe)  # the second stage changed: only it runs again
    assert r.returncode == 0 and r.stderr.count("already done") == 1 and "stage 2/2 images: 4000 pairs" in r.stderr
    assert json.loads((tmp_path / "run" / "02-images" / "stage.json").read_text())["stage"]["epochs"] == 5

    # Hard negatives: mine with the stage-2 encoder, then a third stage trains on them.
    train_pool = flickr / "mbeir" / "cand_pool" / "flickr8k_train_cand_pool.jsonl"
    (tmp_path / "mbeir" / "cand_pool").mkdir(parents=True)
    (tmp_path / "mbeir" / "query").mkdir()
    images_pool = tmp_path / "mbeir" / "cand_pool" / "images_train_cand_pool.jsonl"
    images_pool.write_text("".join(x + "\n" for x in train_pool.read_text().splitlines() if '"modality": "image"' in x))
    queries = tmp_path / "mbeir" / "query" / "t2i_task0_train.jsonl"
    queries.write_text("\n".join((flickr / "mbeir" / "query" / "flickr8k_task0_train.jsonl").read_text().splitlines()[:1000]) + "\n")
    # M-BEIR image paths are relative to the folder above mbeir/: point it at the real images.
    (tmp_path / "images").symlink_to(flickr / "images")
    r = cli_in_process("mine", "--encoder", tmp_path / "run" / "02-images", "--queries", queries, "--pool", images_pool,
                       "--out", tmp_path / "neg.jsonl", "--keep", "4")
    assert r.returncode == 0, r.stderr
    mined = [json.loads(x) for x in (tmp_path / "neg.jsonl").read_text().splitlines()]
    assert len(mined) == 1000 and sum(len(m["neg_cand_list"]) for m in mined) > 3000
    write(recipe, body.replace("epochs: 6", "epochs: 5") + f"""
  - name: hard
    data: {{queries: {tmp_path / 'neg.jsonl'}, pool: {images_pool}}}
    hard_negatives: 4
    epochs: 3
    batch_size: 64
    lr: 1e-4
    schedule: cosine
""")
    r = cli_in_process("train", recipe, "--eval", flickr / "mbeir")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already done") == 2 and "+ 4 hard negatives" in r.stderr
    s3 = json.loads((tmp_path / "run" / "03-hard" / "stage.json").read_text())
    s2 = json.loads((tmp_path / "run" / "02-images" / "stage.json").read_text())
    prov = json.loads((tmp_path / "run" / "03-hard" / "umr_encoder.json").read_text())["provenance"]
    assert prov["data"]["examples"] == 1000 and prov["data"]["negatives"] >= 3000
    assert s3["eval"]["tasks"]["task0"]["hit_rate@5"] > 0.2 and s3["start_fingerprint"] == s2["fingerprint"]


def test_the_shipped_example_recipe_parses(flickr):
    from conftest import ROOT

    rec = load_recipe(ROOT / "recipes" / "staged-example.yaml")
    assert [s.name for s in rec.stages] == ["text", "images"]
    assert rec.out == str(ROOT / "runs" / "staged-example")
    assert rec.stages[0].data.pairs == str(flickr / "captions.txt")
    assert rec.stages[0].data.kind == "caption-caption" and rec.stages[1].weight_decay == 0.5
