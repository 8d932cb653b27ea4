"""The hf-mllm path on a tiny random Qwen2-VL with a locally trained tokenizer: the embedding
(chat template, bidirectional attention, instruction left out of the pooling), LoRA training
through a recipe, save/reload, index and search, and the Yes/No re-ranker."""
import json

import numpy as np
import pytest
import torch

from conftest import FLICKR, cli_in_process, require_data, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from umr.retrieval.encoders.tiny_qwen2vl import build

    return build(tmp_path_factory.mktemp("tiny-qwen2vl"), seed=0)


@pytest.fixture(scope="module")
def encoder(base):
    from umr.retrieval.encoders import load_encoder

    return load_encoder(f"hf-mllm:{base}", cache=False)


@pytest.fixture(scope="module")
def photos():
    """12 training photos of flickr8k-1k with their captions."""
    import csv

    root = require_data(FLICKR)
    train = json.loads((root / "split.json").read_text())["train"][:12]
    caps: dict[str, list[str]] = {}
    with open(root / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            if row["image"] in train:
                caps.setdefault(row["image"], []).append(row["caption"])
    return [(str(root / "images" / name), caps[name]) for name in train]


def test_embeddings_are_unit_rows_from_one_sequence_per_item(encoder, photos):
    from umr.retrieval.items import Item

    image, caps = photos[0]
    rows = encoder.encode([Item(text=caps[0]), Item(image=image), Item(text=caps[0], image=image)])
    assert rows.shape == (3, encoder.dim) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    # image+text is one sequence through the model, not the normalised sum of the two parts
    fused = rows[0] + rows[1]
    assert float(rows[2] @ (fused / np.linalg.norm(fused))) < 0.9999
    # padding in a batch changes nothing
    alone = encoder.encode([Item(text=caps[0])])
    assert np.abs(alone - rows[:1]).max() < 1e-5
    # a text longer than the token budget is cut to it, not refused
    long = caps[0] + " and then" * 2000
    assert len(encoder.tokenizer.encode(long)) > encoder.max_tokens
    assert encoder.encode([Item(text=long, image=image)]).shape == (1, encoder.dim)


def test_attention_is_bidirectional_and_the_instruction_is_not_pooled(encoder):
    from umr.retrieval.encoders.base import Prepared
    from umr.retrieval.items import Item

    batch = encoder.inputs([encoder.render(Prepared("a dog runs across the grass", None))], [])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -3] = changed["input_ids"][0, -5]
    with torch.no_grad():
        first = [encoder.hidden_states(b)[0, 0] for b in (batch, changed)]
        causal = [encoder.hidden_states(b, bidirectional=False)[0, 0] for b in (batch, changed)]
    assert (first[0] - first[1]).abs().max() > 1e-4  # the first token sees a later one
    assert (causal[0] - causal[1]).abs().max() < 1e-6  # the causal model would not

    text = encoder.with_instruction("a dog", "Retrieve a matching image.")
    batch = encoder.inputs([encoder.render(Prepared(text, None))], [])
    ids = batch["input_ids"][0].tolist()
    keep = encoder.pool_mask(batch["input_ids"], batch["attention_mask"])[0].tolist()
    start, end = ids.index(encoder.start_id), ids.index(encoder.end_id)
    assert not any(keep[start : end + 1]) and all(keep[:start]) and all(keep[end + 1 :])
    # the instruction still conditions the pooled tokens through attention
    a = encoder.encode([Item(text="a dog")], role="query", instruction="Retrieve a matching image.")
    b = encoder.encode([Item(text="a dog")], role="query", instruction="Find a caption for it.")
    plain = encoder.encode([Item(text="a dog")], role="query")
    assert float(a[0] @ b[0]) < 0.99999 and float(a[0] @ plain[0]) < 0.99999
    # documents never get the instruction
    assert np.allclose(encoder.encode([Item(text="a dog")], instruction="Retrieve a matching image."),
                       encoder.encode([Item(text="a dog")]))


def test_lora_trains_saves_and_reloads_to_identical_embeddings(base, photos, tmp_path):
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.items import Item
    from umr.training.contrastive import ContrastiveConfig, train_examples
    from umr.training.examples import FeatureBank, Example

    enc = load_encoder(f"hf-mllm:{base}", cache=False)
    before = enc.encode([Item(text=photos[0][1][0]), Item(image=photos[0][0])])
    enc.add_lora(r=4, alpha=8)
    vision = {n: p.detach().clone() for n, p in enc.model.model.visual.named_parameters()}
    bank = FeatureBank()
    examples = [Example(np.array([bank.item(text=c) for c in caps]), np.array([bank.item(image=img)]), np.array([], dtype=np.int64))
                for img, caps in photos]
    cfg = ContrastiveConfig(epochs=4, batch_size=6, lr=3e-3, schedule="constant", trainable="lora", temperature=0.05)
    history = train_examples(enc, bank, examples, cfg)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
    assert all(torch.equal(p, vision[n]) for n, p in enc.model.model.visual.named_parameters())  # frozen
    items = [Item(text=photos[0][1][0]), Item(image=photos[0][0]), Item(text="a dog", image=photos[1][0])]
    trained = enc.encode(items)
    assert np.abs(trained[:2] - before).max() > 1e-3  # LoRA moved the embeddings
    enc.save(tmp_path / "enc")
    saved = json.loads((tmp_path / "enc" / "umr_encoder.json").read_text())
    assert saved["type"] == "mllm" and saved["lora"]["r"] == 4 and not list((tmp_path / "enc").glob("model*"))
    again = load_encoder(str(tmp_path / "enc"), cache=False)
    assert np.array_equal(again.encode(items), trained)
    assert again.fingerprint == enc.fingerprint != load_encoder(f"hf-mllm:{base}", cache=False).fingerprint


@pytest.mark.slow
def test_recipe_index_search_and_yes_no_reranker_end_to_end(base, photos, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"image": img, "text": c} for img, caps in photos for c in caps])
    (tmp_path / "recipe.yaml").write_text(f"""
encoder: hf-mllm:{base}
out: run
stages:
  - name: pairs
    data: {{pairs: pairs.jsonl}}
    trainable: lora
    lora_r: 4
    epochs: 3
    batch_size: 6
    lr: 0.003
    schedule: constant
""")
    r = cli_in_process("train", tmp_path / "recipe.yaml")
    assert r.returncode == 0, r.stderr
    enc_dir = tmp_path / "run" / "01-pairs"
    log = [json.loads(line) for line in (enc_dir / "training_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((enc_dir / "stage.json").read_text())["status"] == "done"

    # index the 12 photos and their first captions with the trained encoder, then search
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"id": f"img{i}", "image": img} for i, (img, _) in enumerate(photos)] +
                         [{"id": f"cap{i}", "text": caps[0]} for i, (_, caps) in enumerate(photos)])
    r = cli_in_process("index", "build", corpus, "--out", tmp_path / "idx", "--encoder", enc_dir)
    assert r.returncode == 0, r.stderr
    r = cli_in_process("search", tmp_path / "idx", photos[3][1][0], "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert hits[0]["id"] == "cap3"  # the indexed copy of the query text ranks first

    # the Yes/No re-ranker: trained on each caption against another photo, then re-ranking
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"did": f"d{i}", "img_path": img, "modality": "image", "txt": None}
                                                 for i, (img, _) in enumerate(photos)])
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"qid": f"q{i}:{j}", "query_txt": c, "query_img_path": None, "query_modality": "text", "task_id": 0,
         "pos_cand_list": [f"d{i}"], "neg_cand_list": [f"d{(i + 1) % len(photos)}", f"d{(i + 5) % len(photos)}"]}
        for i, (_, caps) in enumerate(photos) for j, c in enumerate(caps[:2])])
    r = cli_in_process("reranker", "train", "--backbone", f"hf-mllm:{base}", "--queries", queries, "--pool", pool,
                       "--out", tmp_path / "rr", "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--lora-r", "4")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rr" / "umr_reranker.json").read_text())["type"] == "mllm-yes-no"
    epochs = [line for line in r.stderr.splitlines() if line.startswith("epoch")]
    losses = [float(line.split("loss")[1].split()[0]) for line in epochs]
    assert len(losses) == 4 and losses[-1] < losses[0], r.stderr

    from umr.retrieval.items import Item
    from umr.retrieval.rerank.reranker import load_reranker

    rr = load_reranker(tmp_path / "rr")
    p = rr.score(Item(text=photos[2][1][0]), [Item(image=photos[2][0]), Item(image=photos[3][0])])
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert np.array_equal(p, load_reranker(tmp_path / "rr").score(Item(text=photos[2][1][0]),
                                                                  [Item(image=photos[2][0]), Item(image=photos[3][0])]))
    r = cli_in_process("search", tmp_path / "idx", photos[2][1][0], "-k", "3", "--json", "--reranker", tmp_path / "rr",
                       "--rerank", "5", "--rerank-weight", "0.01")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert all(0 < h["rerank"]["p_yes"] < 1 for h in hits)
    assert all(h["score"] == pytest.approx(h["rerank"]["cosine"] + 0.01 * h["rerank"]["p_yes"], abs=1e-5) for h in hits)

    # over HTTP: a text query and an uploaded image, both re-ranked by the Yes/No model
    import httpx

    from umr.retrieval.engine import Engine
    from umr.server.app import create_app
    from umr.demo import BackgroundServer

    eng = Engine.open(tmp_path / "idx")
    eng.use_reranker(rr, 5, 0.01)  # a light touch: the untrained-scale P(yes) must not bury the exact match
    with BackgroundServer(create_app(eng)) as srv:
        text = httpx.post(srv.url + "/v1/search", json={"text": photos[2][1][0], "k": 3}, timeout=60)
        with open(photos[4][0], "rb") as f:
            image = httpx.post(srv.url + "/v1/search/image", files={"file": f}, data={"k": "2"}, timeout=60)
    eng.close()
    assert text.status_code == 200 and [h["id"] for h in text.json()["results"]] == [h["id"] for h in hits]
    assert image.status_code == 200 and image.json()["results"][0]["id"] == "img4"  # its own indexed copy
    assert all(0 < h["rerank"]["p_yes"] < 1 for h in image.json()["results"])


def test_a_recipe_resolves_the_model_folder_against_its_own_folder(tmp_path):
    from umr.training.recipe import RecipeError, load_recipe

    (tmp_path / "recipes").mkdir()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"image": "a.jpg", "text": "a dog"}])
    (tmp_path / "recipes" / "r.yaml").write_text(f"""
encoder: hf-mllm:../models/qwen
out: ../runs/x
stages:
  - {{name: s, data: {{pairs: {pairs}}}, trainable: lora, lora_r: 0}}
""")
    with pytest.raises(RecipeError, match=r"stage 1 \(s\): lora_r must be at least 1, got 0"):
        load_recipe(tmp_path / "recipes" / "r.yaml")
    (tmp_path / "recipes" / "r.yaml").write_text((tmp_path / "recipes" / "r.yaml").read_text().replace("lora_r: 0", "lora_r: 4"))
    recipe = load_recipe(tmp_path / "recipes" / "r.yaml")
    assert recipe.encoder == f"hf-mllm:{tmp_path / 'models' / 'qwen'}" and recipe.stages[0].lora_r == 4


@pytest.mark.parametrize("padding", [0, 16])
def test_a_base_without_instruction_markers_gets_them_deterministically(tmp_path, padding):
    from umr.retrieval.encoders.mllm import INSTRUCTION_END, INSTRUCTION_START, MllmEncoder
    from umr.retrieval.encoders.tiny_qwen2vl import build
    from umr.retrieval.items import Item

    base = build(tmp_path / "base", markers=False, vocab_padding=padding)
    rows = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    enc = MllmEncoder(base, "a")
    emb = enc.model.get_input_embeddings().weight
    assert emb.shape[0] == max(rows, len(enc.tokenizer))  # grown when needed, never shrunk
    vocab = len(enc.tokenizer) - 2
    assert {enc.start_id, enc.end_id} == {vocab, vocab + 1}
    assert enc.tokenizer.convert_ids_to_tokens([enc.start_id, enc.end_id]) == [INSTRUCTION_START, INSTRUCTION_END]
    assert torch.allclose(emb[enc.start_id], emb[:vocab].mean(0))
    q = enc.encode([Item(text="a dog")], role="query", instruction="Find it.")
    again = MllmEncoder(base, "b")
    assert np.array_equal(again.encode([Item(text="a dog")], role="query", instruction="Find it."), q)
    assert again.fingerprint == enc.fingerprint
