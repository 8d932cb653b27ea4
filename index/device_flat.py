"""A flat segment's vectors held on a torch device, so exact search runs there.

Exact search is a matrix product and a top-k (vector_index.exact_topk); torch runs both on a
GPU with no FAISS build at all, so a flat segment searches on the GPU even where no faiss-gpu
matching the installed torch's CUDA exists. Unlike a GPU FAISS copy it takes a row mask, so
filtered and deleted-row searches stay on the device too. The segment's FAISS index on the
CPU remains the checkpoint; this is a mirror that grows with it.
"""
from __future__ import annotations

import threading

import numpy as np

from umr.index import vector_index as vi


class DeviceFlat:
    """Rows 0..n of a flat index as one float32 tensor on `device`, capacity grown by doubling
    so an add copies only the new rows."""

    def __init__(self, vectors: np.ndarray, device: str):
        import torch

        self.device = torch.device(device)
        self._rows = 0
        self._data = torch.empty((max(len(vectors), 1024), vectors.shape[1]), dtype=torch.float32, device=self.device)
        self._lock = threading.Lock()  # an add replaces `_data`; a search reads one consistent view
        self.add(vectors)

    @property
    def ntotal(self) -> int:
        return self._rows

    def add(self, vectors: np.ndarray) -> None:
        import torch

        with self._lock:
            need = self._rows + len(vectors)
            if need > len(self._data):
                grown = torch.empty((max(need, 2 * len(self._data)), self._data.shape[1]), dtype=torch.float32,
                                    device=self.device)
                grown[: self._rows] = self._data[: self._rows]
                self._data = grown
            self._data[self._rows:need] = vi.as_tensor(vectors).to(self.device)
            self._rows = need

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k, as vector_index.exact_topk answers it on the CPU."""
        with self._lock:
            view = self._data[: self._rows]
        return vi.exact_topk(q, view, k, allowed)
