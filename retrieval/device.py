"""Where encoders run: `--device` (or $UMR_DEVICE); by default the GPU when torch sees one.

Encoders return CPU tensors whatever their device, so everything downstream (the feature
cache, heads, compensators, FAISS on CPU) is unchanged; only the towers' forward passes move.
The index's FAISS search follows the same choice through index.gpu (which cannot import this
module: index sits below retrieval).
"""
from __future__ import annotations

import os

import torch

from umr.index.errors import InvalidArgument
from umr.retrieval.batch_layout import already_stacked, empty_batch


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
    from umr.index import gpu

    gpu.use((_chosen.index or 0) if _chosen.type == "cuda" else None)
    return _chosen


def current() -> torch.device:
    return _chosen if _chosen is not None else choose(None)


def to_cpu(x: torch.Tensor) -> torch.Tensor:
    """An encoder's output as downstream code expects it: float32 on the CPU."""
    return x if x.device.type == "cpu" and x.dtype == torch.float32 else x.float().cpu()


def default_workers() -> int:
    """Decoding threads for a build: one per core this process may use (PIL releases the GIL
    while decoding and resizing, so they scale), at most 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(32, cores))


def default_batch_size(device: torch.device | None = None) -> int:
    """Items per forward pass: 64 keeps a CPU's caches warm; a GPU needs larger batches to be busy."""
    return 256 if (device or current()).type == "cuda" else 64


def stack_batch(tensors: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Preprocessed images as one batch, each row in its images' memory layout
    (retrieval/batch_layout.py); for a CUDA device stacked straight into page-locked memory, so
    that the copy to the device can run without blocking the host. Images that are already the
    consecutive rows of one buffer (as worker processes hand them over,
    retrieval/encoders/prepare_processes.py) are that batch: no second copy, and no parallel
    copy whose idle threads then spin on the cores the workers need."""
    stacked = already_stacked(tensors)
    cuda = (device or current()).type == "cuda"
    if stacked is not None and not cuda:
        return stacked
    out = empty_batch(tensors[0], len(tensors), pin_memory=cuda)
    return out.copy_(stacked) if stacked is not None else torch.stack(tensors, out=out)


def bucket(n: int) -> int:
    """The batch size a CUDA forward of `n` items runs at: the next power of two, so a build's
    last, partial batch (and any odd-sized call) reuses kernels already chosen for a full one
    instead of meeting the GPU as a new shape."""
    return 1 << max(0, (n - 1).bit_length())


def pad_rows(batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` with its last row repeated up to `rows` rows (rows are independent in eval mode,
    so the real rows' outputs do not change)."""
    n = len(batch)
    return batch if rows <= n else torch.cat([batch, batch[-1:].expand(rows - n, *batch.shape[1:])])


def pad_multiple(device: torch.device) -> int:
    """What a text batch's padded length is rounded up to: 8 on CUDA, so that calls meet a few
    shapes (and tensor-core-aligned ones) rather than one per longest text; 1 elsewhere, where
    padding costs compute and no kernels are chosen per shape."""
    return 8 if device.type == "cuda" else 1


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; to CUDA through page-locked memory, so the copy does not block the host."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the batch on `device`, padded to `bucket` rows on CUDA; the number of real rows)."""
    n = len(batch)
    if device.type != "cuda":
        return batch.to(device), n
    batch = pad_rows(batch, bucket(n))
    return batch.to(device, non_blocking=batch.is_pinned()), n
