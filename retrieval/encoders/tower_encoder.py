"""Encoders whose trained part sits on the locked lit towers' features (MiniLM, EfficientNet-Lite0).

The towers never change, so `encode` reads their features from the on-disk feature cache
(retrieval/encoders/feature_cache.py) by the items' content and only the small trained part runs:
mining, evaluation and calibration over data seen before skip the towers entirely.
"""
from __future__ import annotations

import json
import os
from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import towers
from umr.retrieval.encoders.base import Encoder, EncoderError, check_role, fuse
from umr.retrieval.items import Item

CONFIG_FILE = "umr_encoder.json"


def read_folder_config(directory: Path, kind: str) -> dict:
    """A saved encoder folder's config, refused when it is another kind or needs other towers."""
    cfg = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if cfg.get("type") != kind:
        raise EncoderError(f"{directory} holds a {cfg.get('type')!r} encoder, not {kind}")
    if cfg.get("text_tower") != towers.TEXT_TOWER or cfg.get("image_tower") != towers.IMAGE_TOWER:
        raise EncoderError(f"{directory} needs towers {cfg.get('text_tower')}/{cfg.get('image_tower')}, "
                           f"this umr has {towers.TEXT_TOWER}/{towers.IMAGE_TOWER}")
    return cfg


class TowerEncoder(Encoder):
    text_max_tokens = towers.MAX_TOKENS
    reduced_precision = True
    device_resize_crop = staticmethod(towers.resize_crop)

    def __init__(self):
        self.text = towers.text_tower()
        self.image = towers.image_tower()
        self.image_size = towers.IMAGE_SIZE

    def tower_config(self) -> dict:
        return {"text_tower": towers.TEXT_TOWER, "image_tower": towers.IMAGE_TOWER, "image_size": towers.IMAGE_SIZE,
                "image_mean": towers.IMAGE_MEAN, "image_std": towers.IMAGE_STD, "max_tokens": self.text_max_tokens}

    def write_folder(self, directory: str | Path, kind: str, weights_file: str, tensors: dict,
                     provenance: dict | None) -> Path:
        """The folder `read_folder_config` reads: the config plus one safetensors file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(directory / weights_file))
        os.chmod(directory / weights_file, 0o644)
        cfg = {"type": kind, **self.config(), "provenance": provenance}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    @abstractmethod
    def text_head(self, feats: torch.Tensor) -> torch.Tensor:
        """MiniLM features (B x 384, unit rows) -> (B, dim), not yet normalised."""

    @abstractmethod
    def image_head(self, feats: torch.Tensor) -> torch.Tensor:
        """EfficientNet pooled features (B x 1280) -> (B, dim), not yet normalised."""

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return towers.ImageTower.preprocess(image)

    def image_preprocessor(self):
        return towers.ImageTower.preprocess

    @torch.inference_mode()
    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image.features(batch))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_head(self.text.features(texts, self.text_max_tokens))

    @torch.inference_mode()
    def encode(self, items: list[Item], role: str = "document", instruction: str | None = None,
               batch_size: int = 64) -> np.ndarray:
        check_role(role)
        txt_idx, texts, img_idx, images = [], [], [], []
        for r, it in enumerate(items):
            text = it.text if it.text and it.text.strip() else None
            if role == "query":
                text = self.with_instruction(text, instruction)
            if text is None and it.image is None:
                raise InvalidArgument(f"item {it.id!r} has neither text nor image")
            if text is not None:
                txt_idx.append(r)
                texts.append(text)
            if it.image is not None:
                img_idx.append(r)
                images.append(it.image)
        txt = self.text_head(self.text.cached_features(texts, self.text_max_tokens)) if texts else None
        img = self.image_head(self.image.cached_features(images, batch_size=min(batch_size, 32))) if images else None
        return fuse(len(items), self.dim, img_idx, img, txt_idx, txt)
