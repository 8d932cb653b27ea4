"""Search on a GPU when the chosen device is one.

A segment keeps its CPU index (the checkpoint, tombstones by ID selector, adds); a device copy
answers searches. Flat segments are mirrored as a torch tensor on the device
(index/device_flat.py), which needs no faiss-gpu and takes masks. IVF-PQ segments get a GPU
FAISS copy when faiss-gpu is installed (`umr[gpu-cu12]` / `umr[gpu-cu13]`): it answers the
searches that need no mask (no filter, no deleted rows) and trains IVF cells; GPU FAISS takes
no ID selector, so masked searches stay on the CPU, as does HNSW (no GPU version). On
`--device cpu` nothing here does anything.
"""
from __future__ import annotations

import logging
import threading

import faiss

from umr.index.index_kinds import kind_of

log = logging.getLogger("umr.index")
MAX_K = 2048  # GPU FAISS returns at most this many neighbours per query
_device: int | None = None  # FAISS's GPU
_torch_device: str | None = None  # where flat segments are mirrored for torch search
_resources = None
_lock = threading.Lock()


def available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use(device: int | None) -> None:
    """GPU number `device` for search from now on (None: the CPU)."""
    global _device, _torch_device
    _device = device if device is not None and available() else None
    _torch_device = f"cuda:{device}" if device is not None and _torch_cuda() else None


def mirror_flat_on(torch_device: str | None) -> None:
    """Mirror flat segments loaded from now on onto `torch_device` ("cuda:0"; None: no mirror).
    `use` sets it; naming "cpu" runs the mirror's code on a machine without a GPU."""
    global _torch_device
    _torch_device = torch_device


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def active() -> bool:
    return _device is not None


def _res():
    global _resources
    with _lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


def search_copy(index: faiss.Index, kind: str):
    """A device copy of a flat index (a DeviceFlat, any search) or of an IVF-PQ index (GPU
    FAISS, unmasked searches), or None."""
    traits = kind_of(kind)
    if traits.scanned and _torch_device is not None:
        from umr.index.device_flat import DeviceFlat
        from umr.index.vector_index import flat_vectors

        return DeviceFlat(flat_vectors(index), _torch_device)
    if not active() or not traits.faiss_gpu:
        return None
    try:
        options = faiss.GpuClonerOptions()
        options.useFloat16LookupTables = True  # IVF-PQ with 64 sub-quantizers needs them on most GPUs
        return faiss.index_cpu_to_gpu(_res(), _device, index, options)
    except RuntimeError as e:  # a parameter this GPU build does not take: stay on the CPU
        log.warning("FAISS index stays on the CPU: %s", str(e).splitlines()[0][:200])
        return None


def train_on_gpu(ivf: faiss.Index) -> None:
    """Let an IVF index's k-means assign points with a GPU flat index (FAISS's own recipe)."""
    if active() and hasattr(ivf, "clustering_index"):
        ivf.clustering_index = faiss.index_cpu_to_gpu(_res(), _device, faiss.IndexFlatL2(ivf.d))


# faiss-gpu wheels are built per CUDA major version; one built for another major than the
# installed torch's cannot load its CUDA runtime beside it, so FAISS silently stays on the CPU.
EXTRA_FOR_CUDA_MAJOR = {"12": "gpu-cu12", "13": "gpu-cu13"}


def matching_extra(torch_cuda: str | None) -> str | None:
    """The `umr[...]` extra whose faiss-gpu matches a torch built for CUDA `torch_cuda` ("13.0")."""
    return EXTRA_FOR_CUDA_MAJOR.get((torch_cuda or "").split(".")[0]) if torch_cuda else None


def where_search_runs(kind: str, copy) -> str:
    """One segment's search, in words: what answers it and on which device (`copy`: the
    segment's device copy, from `search_copy`)."""
    if copy is not None and kind_of(kind).scanned:
        return f"{copy.device} (torch matrix product + top-k)"
    if copy is not None:
        return f"GPU {_device} (faiss-gpu {kind}, unmasked searches; masked ones on the CPU)"
    if kind_of(kind).scanned:
        return "CPU (torch matrix product + top-k)"
    return f"CPU (faiss {kind})"


def describe() -> dict:
    """The FAISS build and devices in play, with the extra to install when they do not match."""
    import torch

    cuda = torch.version.cuda
    out = {"faiss": faiss.__version__, "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
           "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
           "search_device": f"cuda:{_device}" if active() else (_torch_device or "cpu"),
           "flat_search_device": _torch_device or "cpu",
           "torch_cuda": cuda, "torch_sees_gpu": torch.cuda.is_available()}
    if out["torch_sees_gpu"] and not out["faiss_gpu"]:
        extra = matching_extra(cuda)
        out["hint"] = (f"FAISS runs on the CPU: torch has CUDA {cuda}; pip uninstall faiss-cpu && pip install "
                       f"'umr[{extra}]'" if extra else f"FAISS runs on the CPU: no faiss-gpu build is known for CUDA {cuda}")
    return out
