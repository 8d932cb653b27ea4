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


def in_slices(fn, rows, step: int, desc: str, enabled: bool, unit: str = "item"):
    """fn(rows) computed slice by slice, advancing a bar after each; the slices' outputs (an
    array, or a tuple of arrays) are concatenated, so the answer is the one of a single call.
    Without a bar, one call."""
    progress = bar(len(rows), desc, enabled, unit=unit)
    if progress is None:
        return fn(rows)
    try:
        parts = []
        for i in range(0, len(rows), step):
            parts.append(fn(rows[i:i + step]))
            progress.update(len(rows[i:i + step]))
    finally:
        progress.close()
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


def encode_with_bar(encoder, items: list, desc: str, enabled: bool, batch_size: int = 64, **kwargs) -> np.ndarray:
    """encoder.encode(items) in slices of a few batches, advancing a bar after each."""
    if not items:
        return encoder.encode(items, batch_size=batch_size, **kwargs)
    return in_slices(lambda part: encoder.encode(part, batch_size=batch_size, **kwargs), items, batch_size * 4,
                     desc, enabled)
