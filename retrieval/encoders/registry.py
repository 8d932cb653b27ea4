"""Spec strings -> encoders, open_clip style.

    lit-base                      the offline default (shipped heads over MiniLM + EfficientNet-Lite0)
    lit-init[:DIM[:SEED]]         the lit towers with fresh random heads (a starting point for training)
    openclip:ARCH/PRETRAINED      open_clip pretrained tag (needs a hub or a filled cache)
    openclip:ARCH@PATH            open_clip architecture with a local checkpoint
    hf-text:PATH                  a local transformers text model, mean-pooled
    hf-mllm:PATH                  a local Qwen2-VL family model (chat template, bidirectional, mean-pooled)
    tiny-clip[:SEED]              a tiny random CLIP, for tests
    DIR                           an encoder directory saved by `umr train`
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from retrieval.encoders.base import Encoder, EncoderError

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
_cache: dict[str, Encoder] = {}
_lock = threading.Lock()


def builtin_path(name: str) -> Path:
    return WEIGHTS / name


def _load(spec: str) -> Encoder:
    from retrieval.encoders.lit import CONFIG_FILE, LitEncoder

    if spec == "lit-base":
        path = builtin_path("lit-base")
        if not (path / CONFIG_FILE).exists():
            raise EncoderError(f"lit-base heads are missing from {path}; reinstall umr")
        return LitEncoder.load(path, spec="lit-base")
    if spec.startswith("lit-init"):
        parts = spec.split(":")
        dim = int(parts[1]) if len(parts) > 1 else 256
        seed = int(parts[2]) if len(parts) > 2 else 0
        return LitEncoder.fresh(dim, seed, spec)
    if spec.startswith("openclip:"):
        from retrieval.encoders.openclip import OpenClipEncoder

        return OpenClipEncoder.from_spec(spec)
    if spec.startswith("tiny-clip"):
        from retrieval.encoders.openclip import OpenClipEncoder

        seed = int(spec.split(":")[1]) if ":" in spec else 0
        return OpenClipEncoder.tiny(seed)
    if spec.startswith("hf-text:"):
        from retrieval.encoders.hf_text import HfTextEncoder

        return HfTextEncoder(spec.split(":", 1)[1], spec)
    if spec.startswith("hf-mllm:"):
        from retrieval.encoders.mllm import MllmEncoder

        return MllmEncoder(spec.split(":", 1)[1], spec)
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        kind = json.loads((path / CONFIG_FILE).read_text()).get("type")
        if kind == "lit":
            return LitEncoder.load(path, spec=str(path.resolve()))
        if kind == "mllm":
            from retrieval.encoders.mllm import MllmEncoder

            return MllmEncoder.load(path)
        raise EncoderError(f"{path}: unknown encoder type {kind!r}")
    raise EncoderError(
        f"unknown encoder {spec!r}: use lit-base, openclip:ARCH/PRETRAINED, openclip:ARCH@PATH, "
        "hf-text:PATH, hf-mllm:PATH, tiny-clip, or a directory saved by `umr train`"
    )


def load_encoder(spec: str, cache: bool = True) -> Encoder:
    """Resolve a spec; loaded encoders are shared within the process (models take seconds)."""
    spec = str(spec)
    with _lock:
        if cache and spec in _cache:
            return _cache[spec]
    enc = _load(spec)
    if cache:
        with _lock:
            _cache.setdefault(spec, enc)
            enc = _cache[spec]
    return enc
