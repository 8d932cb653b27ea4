"""Spec strings -> encoders, open_clip style.

    lit-base                      the offline default: its latest version (shipped weights over MiniLM + EfficientNet-Lite0)
    lit-base@N                    version N of the default, pinned (an index records which one filled it)
    lit-bridge                    zero-shot: texts are MiniLM's own vectors, images reach them through ImageNet concepts
    lit-init[:DIM[:SEED]]         the lit towers with fresh random heads (a starting point for training)
    lit-concept-init[:SEED]       the concept bridge with an untrained image map (where lit-base v2 trains from)
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

from umr.retrieval.encoders.base import Encoder, EncoderError
from umr.retrieval.encoders.builtin import BUILTIN_VERSIONS, builtin_path, builtin_versions
from umr.retrieval.encoders.tower_encoder import CONFIG_FILE

_cache: dict[str, Encoder] = {}
_lock = threading.Lock()


def _builtin_folder(spec: str) -> Path:
    name, _, version = spec.partition("@")
    versions = BUILTIN_VERSIONS[name]
    if version and (not version.isdigit() or int(version) not in versions):
        raise EncoderError(f"unknown version {spec!r}: {name} has " + ", ".join(builtin_versions(name)))
    path = builtin_path(versions[int(version) if version else max(versions)])
    if not (path / CONFIG_FILE).exists():
        raise EncoderError(f"{spec} weights are missing from {path}; reinstall umr")
    return path


def _load_folder(path: Path, spec: str) -> Encoder:
    """A self-describing encoder folder (a built-in, or one `umr train` saved), by its type."""
    kind = json.loads((path / CONFIG_FILE).read_text()).get("type")
    if kind == "lit":
        from umr.retrieval.encoders.lit import LitEncoder

        return LitEncoder.load(path, spec=spec)
    if kind == "lit-bridge":
        from umr.retrieval.encoders.bridge import BridgeEncoder

        return BridgeEncoder.load(path, spec=spec)
    if kind == "lit-concept":
        from umr.retrieval.encoders.concept import ConceptEncoder

        return ConceptEncoder.load(path, spec=spec)
    if kind == "mllm":
        from umr.retrieval.encoders.mllm import MllmEncoder

        return MllmEncoder.load(path)
    raise EncoderError(f"{path}: unknown encoder type {kind!r}")


def _numbers(spec: str, form: str, defaults: tuple[int, ...]) -> tuple[int, ...]:
    """The integers after the name in `name:A:B`, each defaulting; a malformed spec is refused
    with the form it should have."""
    given = spec.split(":")[1:]
    if len(given) > len(defaults) or not all(g.isdigit() for g in given):
        raise EncoderError(f"malformed encoder spec {spec!r}: the form is {form}, with whole numbers (e.g. "
                           f"{form.split('[')[0]}:{':'.join(str(d) for d in defaults)})")
    return tuple(int(g) for g in given) + defaults[len(given):]


def _load(spec: str) -> Encoder:
    if spec.split("@", 1)[0] in BUILTIN_VERSIONS:
        return _load_folder(_builtin_folder(spec), spec)
    if spec == "lit-init" or spec.startswith("lit-init:"):
        from umr.retrieval.encoders.lit import LitEncoder

        dim, seed = _numbers(spec, "lit-init[:DIM[:SEED]]", (256, 0))
        if dim < 1:
            raise EncoderError(f"{spec!r}: DIM in lit-init[:DIM[:SEED]] is the width of the heads, at least 1")
        return LitEncoder.fresh(dim, seed, spec)
    if spec == "lit-concept-init" or spec.startswith("lit-concept-init:"):
        from umr.retrieval.encoders.concept import ConceptEncoder

        (seed,) = _numbers(spec, "lit-concept-init[:SEED]", (0,))
        return ConceptEncoder.fresh(seed, spec)
    if spec.startswith("openclip:"):
        from umr.retrieval.encoders.openclip import OpenClipEncoder

        return OpenClipEncoder.from_spec(spec)
    if spec == "tiny-clip" or spec.startswith("tiny-clip:"):
        from umr.retrieval.encoders.openclip import OpenClipEncoder

        (seed,) = _numbers(spec, "tiny-clip[:SEED]", (0,))
        return OpenClipEncoder.tiny(seed)
    if spec.startswith("hf-text:"):
        from umr.retrieval.encoders.hf_text import HfTextEncoder

        return HfTextEncoder(spec.split(":", 1)[1], spec)
    if spec.startswith("hf-mllm:"):
        from umr.retrieval.encoders.mllm import MllmEncoder

        return MllmEncoder(spec.split(":", 1)[1], spec)
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return _load_folder(path, str(path.resolve()))
    raise EncoderError(
        f"unknown encoder {spec!r}: use lit-base (or lit-base@N), lit-bridge, lit-init, lit-concept-init, openclip:ARCH/PRETRAINED, openclip:ARCH@PATH, "
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


def release(encoder: Encoder) -> None:
    """Drop the process's shared reference to a loaded encoder (e.g. one a server swapped
    away from), so its weights are freed once nothing else uses it."""
    with _lock:
        for spec in [s for s, e in _cache.items() if e is encoder]:
            del _cache[spec]


def load_recorded(record: dict) -> Encoder:
    """The encoder an index recorded (`spec` and `fingerprint`). A built-in named by its bare
    name may have moved on to a newer version since; then the pinned version whose fingerprint
    matches is loaded, so indexes built with an older default keep working. When nothing
    matches, the encoder the spec names now is returned and the caller reports the mismatch."""
    enc = load_encoder(record["spec"])
    if enc.fingerprint == record.get("fingerprint"):
        return enc
    for pinned in builtin_versions(record["spec"]):
        if pinned != record["spec"]:
            candidate = load_encoder(pinned)
            if candidate.fingerprint == record.get("fingerprint"):
                return candidate
    return enc
