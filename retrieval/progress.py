"""Progress bars on stderr (tqdm) for the long commands, and encoding in slices so that a bar
moves while a large list is embedded."""
from __future__ import annotations

import sys

import numpy as np


def bar(total: int | None, desc: str, enabled: bool = True, initial: int = 0, unit: str = "item"):
    """A tqdm bar on stderr, or None when disabled (callers check)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def encode_with_bar(encoder, items: list, desc: str, enabled: bool, batch_size: int = 64, **kwargs) -> np.ndarray:
    """encoder.encode(items) in slices of a few batches, advancing a bar after each."""
    progress = bar(len(items), desc, enabled)
    if progress is None:
        return encoder.encode(items, batch_size=batch_size, **kwargs)
    step = batch_size * 4
    try:
        parts = []
        for i in range(0, len(items), step):
            parts.append(encoder.encode(items[i:i + step], batch_size=batch_size, **kwargs))
            progress.update(len(items[i:i + step]))
        return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)
    finally:
        progress.close()
