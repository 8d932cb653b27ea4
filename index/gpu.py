"""FAISS on a GPU, when faiss-gpu is installed (`umr[gpu]`) and the chosen device is a GPU.

A segment keeps its CPU index (the checkpoint, tombstones by ID selector, adds); a GPU copy
answers the searches that need no mask (no filter, no deleted rows) and trains IVF cells.
GPU FAISS takes no ID selector, so masked searches stay on the CPU, as does HNSW (no GPU
version). Without faiss-gpu, or on `--device cpu`, nothing here does anything.
"""
from __future__ import annotations

import logging
import threading

import faiss

log = logging.getLogger("umr.index")
MAX_K = 2048  # GPU FAISS returns at most this many neighbours per query
_device: int | None = None
_resources = None
_lock = threading.Lock()


def available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use(device: int | None) -> None:
    """GPU number `device` for FAISS from now on (None: the CPU)."""
    global _device
    _device = device if device is not None and available() else None


def active() -> bool:
    return _device is not None


def _res():
    global _resources
    with _lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


def search_copy(index: faiss.Index, kind: str):
    """A GPU copy of a flat or IVF-PQ index for unmasked searches, or None."""
    if not active() or kind not in ("flat", "ivfpq"):
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


def where_search_runs(kind: str, has_gpu_copy: bool) -> str:
    """One segment's search, in words: what answers it and on which device."""
    if has_gpu_copy:
        return f"GPU {_device} (faiss-gpu {kind}, unmasked searches; masked ones on the CPU)"
    if kind == "flat":
        return "CPU (torch matrix product + top-k)"
    return f"CPU (faiss {kind})"


def describe() -> dict:
    """The FAISS build and devices in play, with the extra to install when they do not match."""
    import torch

    cuda = torch.version.cuda
    out = {"faiss": faiss.__version__, "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
           "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
           "search_device": f"cuda:{_device}" if active() else "cpu",
           "torch_cuda": cuda, "torch_sees_gpu": torch.cuda.is_available()}
    if out["torch_sees_gpu"] and not out["faiss_gpu"]:
        extra = matching_extra(cuda)
        out["hint"] = (f"FAISS runs on the CPU: torch has CUDA {cuda}; pip uninstall faiss-cpu && pip install "
                       f"'umr[{extra}]'" if extra else f"FAISS runs on the CPU: no faiss-gpu build is known for CUDA {cuda}")
    return out
