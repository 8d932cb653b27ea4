"""Data-parallel training under `torchrun`: every rank draws the same global batch, embeds its
own slice, and the slices are gathered (with gradients) so each query's in-batch negatives
span the global batch, as U-MARVEL gathers them across GPUs.

Each rank then computes the same global loss. The autograd all-gather sums the gradient that
flows back into a rank's slice over all ranks, so every parameter gradient is the world size
times its share; summing the shares across ranks and dividing by the world size gives exactly
the single-process gradient. Two ranks therefore end where one process with the same global
batch ends (tests/test_distributed.py checks that).

The collective is gloo over CPU tensors: embeddings are small (batch x dim), and gloo runs on
every machine, with or without GPUs.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Joins the process group `torchrun` describes; False when run as a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def embed_global(embed, ids: np.ndarray) -> torch.Tensor:
    """`embed(ids)` for the whole global batch, each rank computing one contiguous slice (the
    last padded by repeating an id, trimmed after the gather)."""
    rank, size = world()
    if size == 1 or len(ids) == 0:
        return embed(ids)
    import warnings

    from torch.distributed.nn.functional import all_gather

    per = -(-len(ids) // size)
    padded = np.concatenate([ids, np.repeat(ids[-1:], per * size - len(ids))])
    local = embed(padded[rank * per : (rank + 1) * per])
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(local.contiguous()))[: len(ids)]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """See the module docstring: sum over ranks, divide by the world size."""
    size = world()[1]
    if size == 1:
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        flat = grad.detach().float().cpu()
        dist.all_reduce(flat)
        p.grad = (flat / size).to(device=p.device, dtype=p.dtype)
