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
