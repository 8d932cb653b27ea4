"""Where encoders run: `--device` (or $UMR_DEVICE); by default the GPU when torch sees one.

Encoders return CPU tensors whatever their device, so everything downstream (the feature
cache, heads, compensators, FAISS on CPU) is unchanged; only the towers' forward passes move.
The index's FAISS search follows the same choice through index.gpu (which cannot import this
module: index sits below retrieval).
"""
from __future__ import annotations

import os

import torch

from index.errors import InvalidArgument


class DeviceError(InvalidArgument):
    """A --device this machine does not have."""


CHOICES = "auto, cpu, cuda or cuda:N"
_chosen: torch.device | None = None


def parse(name: str | None) -> torch.device:
    name = (name or os.environ.get("UMR_DEVICE") or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: torch sees no CUDA device on this machine "
                               "(torch.cuda.is_available() is False); use --device cpu, or auto")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}: use {CHOICES}")


def choose(name: str | None) -> torch.device:
    """Set the device for every encoder loaded from now on (and FAISS search on a GPU when
    faiss-gpu is installed); returns it."""
    global _chosen
    _chosen = parse(name)
    from index import gpu

    gpu.use((_chosen.index or 0) if _chosen.type == "cuda" else None)
    return _chosen


def current() -> torch.device:
    return _chosen if _chosen is not None else choose(None)


def to_cpu(x: torch.Tensor) -> torch.Tensor:
    """An encoder's output as downstream code expects it: float32 on the CPU."""
    return x if x.device.type == "cpu" and x.dtype == torch.float32 else x.float().cpu()
