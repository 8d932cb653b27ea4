"""Spec strings -> encoders, open_clip style: the table SPECS below (`register` adds to it).

Every form a spec may take is one row there, with what it means; the error for an unknown spec
and `umr encoders`-style listings are generated from it. A path to a folder `umr train` saved
is always accepted besides, its type read from its config (`register_folder_type`).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


_FOLDER_TYPES: dict[str, Callable[[Path, str], Encoder]] = {}


def register_folder_type(kind: str, load: Callable[[Path, str], Encoder]) -> None:
    """Load saved encoder folders whose config says `"type": kind` with load(path, spec)."""
    _FOLDER_TYPES[kind] = load


def _load_folder(path: Path, spec: str) -> Encoder:
    """A self-describing encoder folder (a built-in, or one `umr train` saved), by its type."""
    kind = json.loads((path / CONFIG_FILE).read_text()).get("type")
    if kind not in _FOLDER_TYPES:
        raise EncoderError(f"{path}: unknown encoder type {kind!r} (known: {', '.join(_FOLDER_TYPES)})")
    return _FOLDER_TYPES[kind](path, spec)


def _lit_folder(path, spec):
    from umr.retrieval.encoders.lit import LitEncoder

    return LitEncoder.load(path, spec=spec)


def _bridge_folder(path, spec):
    from umr.retrieval.encoders.bridge import BridgeEncoder

    return BridgeEncoder.load(path, spec=spec)


def _concept_folder(path, spec):
    from umr.retrieval.encoders.concept import ConceptEncoder

    return ConceptEncoder.load(path, spec=spec)


def _mllm_folder(path, spec):
    from umr.retrieval.encoders.mllm import MllmEncoder

    return MllmEncoder.load(path)


for _kind, _fn in (("lit", _lit_folder), ("lit-bridge", _bridge_folder), ("lit-concept", _concept_folder),
                   ("mllm", _mllm_folder)):
    register_folder_type(_kind, _fn)


def _numbers(spec: str, form: str, defaults: tuple[int, ...]) -> tuple[int, ...]:
    """The integers after the name in `name:A:B`, each defaulting; a malformed spec is refused
    with the form it should have."""
    given = spec.split(":")[1:]
    if len(given) > len(defaults) or not all(g.isdigit() for g in given):
        raise EncoderError(f"malformed encoder spec {spec!r}: the form is {form}, with whole numbers (e.g. "
                           f"{form.split('[')[0]}:{':'.join(str(d) for d in defaults)})")
    return tuple(int(g) for g in given) + defaults[len(given):]


@dataclass(frozen=True)
class SpecForm:
    """One form of encoder spec: `name`, `name:ARGS` where it takes arguments, `name@N` where
    it is a built-in with pinned versions."""

    name: str
    form: str  # as a user writes it, e.g. "tiny-clip[:SEED]"
    means: str
    load: Callable[[str], Encoder]
    versioned: bool = False

    def matches(self, spec: str) -> bool:
        if self.versioned:
            return spec.split("@", 1)[0] == self.name
        return spec == self.name or spec.startswith(self.name + ":")


SPECS: list[SpecForm] = []


def register(name: str, form: str, means: str, load: Callable[[str], Encoder], versioned: bool = False) -> None:
    """Make `name` (and `name:...`, or `name@N` when `versioned`) a spec that load(spec)
    resolves; listed after the others."""
    if any(f.name == name for f in SPECS):
        raise ValueError(f"an encoder spec {name!r} is registered already")
    SPECS.append(SpecForm(name, form, means, load, versioned))


def _builtin(spec):
    return _load_folder(_builtin_folder(spec), spec)


def _lit_init(spec):
    from umr.retrieval.encoders.lit import LitEncoder

    dim, seed = _numbers(spec, "lit-init[:DIM[:SEED]]", (256, 0))
    if dim < 1:
        raise EncoderError(f"{spec!r}: DIM in lit-init[:DIM[:SEED]] is the width of the heads, at least 1")
    return LitEncoder.fresh(dim, seed, spec)


def _concept_init(spec):
    from umr.retrieval.encoders.concept import ConceptEncoder

    (seed,) = _numbers(spec, "lit-concept-init[:SEED]", (0,))
    return ConceptEncoder.fresh(seed, spec)


def _openclip(spec):
    from umr.retrieval.encoders.openclip import OpenClipEncoder

    _argument(spec, "openclip:ARCH/PRETRAINED or openclip:ARCH@PATH")
    return OpenClipEncoder.from_spec(spec)


def _tiny_clip(spec):
    from umr.retrieval.encoders.openclip import OpenClipEncoder

    (seed,) = _numbers(spec, "tiny-clip[:SEED]", (0,))
    return OpenClipEncoder.tiny(seed)


def _argument(spec: str, form: str) -> str:
    """What follows `name:` in a spec whose form needs it."""
    name, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise EncoderError(f"encoder spec {spec!r} needs more: the form is {form}")
    return arg


def _hf_text(spec):
    from umr.retrieval.encoders.hf_text import HfTextEncoder

    return HfTextEncoder(_argument(spec, "hf-text:PATH"), spec)


def _hf_mllm(spec):
    from umr.retrieval.encoders.mllm import MllmEncoder

    return MllmEncoder(_argument(spec, "hf-mllm:PATH"), spec)


for _row in (
    ("lit-base", "lit-base[@N]", "the offline default, its latest version (shipped weights over MiniLM + "
     "EfficientNet-Lite0); @N pins version N, as an index records it", _builtin, True),
    ("lit-bridge", "lit-bridge", "zero-shot: texts are MiniLM's own vectors, images reach them through ImageNet "
     "concepts", _builtin, True),
    ("lit-init", "lit-init[:DIM[:SEED]]", "the lit towers with fresh random heads (a starting point for training)",
     _lit_init),
    ("lit-concept-init", "lit-concept-init[:SEED]", "the concept bridge with an untrained image map (where lit-base "
     "v2 trains from)", _concept_init),
    ("openclip", "openclip:ARCH/PRETRAINED or openclip:ARCH@PATH", "an open_clip model: a pretrained tag (needs a "
     "hub or a filled cache) or an architecture with a local checkpoint", _openclip),
    ("hf-text", "hf-text:PATH", "a local transformers text model, mean-pooled", _hf_text),
    ("hf-mllm", "hf-mllm:PATH", "a local Qwen2-VL family model (chat template, bidirectional, mean-pooled)", _hf_mllm),
    ("tiny-clip", "tiny-clip[:SEED]", "a tiny random CLIP, for tests", _tiny_clip),
):
    register(*_row)


def _load(spec: str) -> Encoder:
    for form in SPECS:
        if form.matches(spec):
            return form.load(spec)
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return _load_folder(path, str(path.resolve()))
    raise EncoderError(f"unknown encoder {spec!r}: use {', '.join(f.form for f in SPECS)}, "
                       "or a directory saved by `umr train`")


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
