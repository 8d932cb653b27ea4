"""How preprocessed images lie in memory, and batches that keep that layout.

PIL decodes pixels as height x width x channels. torchvision's uint8 resize of them (viewed as
CHW) writes its output in that same HWC order, which is also what the image tower's
channels_last convolutions read. Copying each image to a contiguous CHW tensor, only for the
forward to copy the batch back to channels_last, cost a tenth of an image's preparation in a
build's workers. So an image keeps the dense layout its last kernel wrote, whatever it is,
and everything that moves images (the workers' shared rows, a batch) keeps it too: a tensor's
shape says what it is, its strides only where its bytes lie.
"""
from __future__ import annotations

import torch


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """`t`'s dimensions from outermost to innermost in memory, where `t` fills its span with
    no gaps or overlaps (then `t.permute(order)` is contiguous); None where it does not."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return order if t.permute(order).is_contiguous() else None


def inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def compact(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """A dense copy of `t` (a crop, say) laid out in memory in `order`; `t` itself when it is."""
    return t.permute(order).contiguous().permute(inverse(order))


def flat_bytes(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`t`'s elements as one contiguous row in the order they lie in memory (no copy for a dense
    tensor), with that order, so that `from_flat` lays them out again as they were."""
    order = memory_order(t)
    if order is None:
        t, order = t.contiguous(), tuple(range(t.dim()))
    return t.permute(order).reshape(-1), order


def from_flat(flat: torch.Tensor, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """The tensor of `shape` whose elements `flat` holds in memory `order` (a view, no copy)."""
    return flat.view([shape[d] for d in order]).permute(inverse(order))


def empty_batch(first: torch.Tensor, n: int, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised batch of `n` tensors like `first`, each row laid out as `first` is (so
    copying rows in moves bytes and transposes nothing)."""
    order = memory_order(first) or tuple(range(first.dim()))
    rows = torch.empty((n, *[first.shape[d] for d in order]), dtype=first.dtype, pin_memory=pin_memory)
    return rows.permute(0, *(1 + d for d in inverse(order)))


def already_stacked(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch whose rows `tensors` are, when they already lie one after another in one
    buffer, dense, alike and in order (as worker processes hand them over); else None."""
    if not tensors:
        return None
    first = tensors[0]
    if memory_order(first) is None:
        return None
    step = first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
                or t.device != first.device or t.untyped_storage().data_ptr() != storage
                or t.data_ptr() != first.data_ptr() + i * step):
            return None
    return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()))
