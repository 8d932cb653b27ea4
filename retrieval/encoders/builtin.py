"""The encoders shipped with umr, by version: their folders under retrieval/weights.

Apart from the registry, so that an encoder which reads shipped weights (the concept bridge
reads lit-bridge's) needs no import of the registry that constructs it.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

# The bare name is the latest. A new default never breaks an index built with an older one: the
# index records the fingerprint, and registry.load_recorded finds the pinned version that matches.
BUILTIN_VERSIONS = {"lit-base": {1: "lit-base-v1", 2: "lit-base-v2"}, "lit-bridge": {1: "lit-bridge"}}


def builtin_path(name: str) -> Path:
    return WEIGHTS / name


def builtin_versions(name: str) -> list[str]:
    """Pinned specs of a built-in encoder, newest first (empty for any other spec)."""
    base = name.split("@", 1)[0]
    return [f"{base}@{v}" for v in sorted(BUILTIN_VERSIONS.get(base, {}), reverse=True)]
