"""open_clip dual encoders: pretrained tags, local checkpoints, and tiny random configs for tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

from umr.retrieval import numerics
from umr.retrieval.encoders.base import Encoder, EncoderError, sha256_file
from umr.retrieval.encoders.serial import serial

# A ~3M-parameter CLIP that runs thousands of items per second on 2 cores: for tests only.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "umr-tiny"


def register_tiny() -> None:
    from open_clip.factory import _MODEL_CONFIGS

    if TINY_NAME not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[TINY_NAME] = dict(TINY_CLIP)


class OpenClipEncoder(Encoder):
    reduced_precision = True

    def __init__(self, model, preprocess, tokenizer, spec: str, arch: str, digest: str):
        from umr.retrieval.device import current

        self.device = current()
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.tokenizer = serial(tokenizer)  # shared by threads (retrieval/encoders/serial.py)
        self.spec = spec
        self.arch = arch
        self._digest = digest
        self.dim = int(model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor)
                       else model.text_projection.out_features)
        self.image_size = int(getattr(model.visual, "image_size", (224, 224))[0]
                              if isinstance(getattr(model.visual, "image_size", 224), (tuple, list))
                              else getattr(model.visual, "image_size", 224))

    @classmethod
    def from_spec(cls, spec: str) -> "OpenClipEncoder":
        import open_clip

        register_tiny()
        body = spec.split(":", 1)[1]
        if "@" in body:
            arch, path = body.split("@", 1)
            if not Path(path).exists():
                raise EncoderError(f"checkpoint not found: {path}")
            pretrained, digest = path, sha256_file(path)
        elif "/" in body:
            arch, pretrained = body.split("/", 1)
            digest = f"tag:{pretrained}"
        else:
            raise EncoderError(f"cannot read {spec!r}: use openclip:ARCH/PRETRAINED or openclip:ARCH@/path/to/checkpoint")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu")
        except RuntimeError as e:
            if "@" not in body:
                raise EncoderError(
                    f"could not load {spec}: the weights are not on this machine and no model hub is reachable "
                    f"({str(e).splitlines()[0][:200]}). Download the checkpoint elsewhere and use openclip:{arch}@/path/to/open_clip_pytorch_model.bin"
                ) from None
            raise EncoderError(f"could not load {spec}: {str(e).splitlines()[0][:300]}") from None
        except Exception as e:  # hub errors come in many classes
            raise EncoderError(
                f"could not load {spec}: {e.__class__.__name__}: {str(e)[:200]}. "
                f"Without a model hub, give a local checkpoint: openclip:{arch}@/path/to/checkpoint"
            ) from None
        return cls(model, preprocess, open_clip.get_tokenizer(arch), spec, arch, digest)

    @classmethod
    def tiny(cls, seed: int = 0) -> "OpenClipEncoder":
        import open_clip

        register_tiny()
        torch.manual_seed(seed)
        _quiet_tiny_warning()
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=None, device="cpu")
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        return cls(model, preprocess, open_clip.get_tokenizer(TINY_NAME), "tiny-clip" + (f":{seed}" if seed else ""),
                   TINY_NAME, h.hexdigest())

    def config(self) -> dict:
        return {"kind": "openclip", "arch": self.arch, "image_size": self.image_size}

    def weights_digest(self) -> str:
        return self._digest

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    def image_preprocessor(self):
        return self.preprocess  # torchvision transforms: no weights

    @torch.inference_mode()
    def embed_images(self, batch: torch.Tensor) -> torch.Tensor:
        from umr.retrieval.device import to_cpu

        with numerics.current().autocast(self.device):
            return to_cpu(self.model.encode_image(batch.to(self.device)))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        from umr.retrieval.device import to_cpu

        with numerics.current().autocast(self.device):
            return to_cpu(self.model.encode_text(self.tokenizer(texts).to(self.device)))


def _drop_tiny_warning(record) -> bool:
    """False for open_clip's warning that the tiny test model has no pretrained weights (it is
    random on purpose); every other record passes."""
    return not (record.levelno <= 30 and "open_clip" in record.pathname and TINY_NAME in record.getMessage())


def _quiet_tiny_warning() -> None:
    """open_clip logs through the root logger, so the filter sits there, installed once; the root
    logger's level, which the application owns, is never touched."""
    import logging

    root = logging.getLogger()
    if _drop_tiny_warning not in root.filters:
        root.addFilter(_drop_tiny_warning)
