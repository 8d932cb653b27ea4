"""Contrastive losses over cosine similarities scaled by a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
             symmetric: bool = True) -> torch.Tensor:
    """Row i of `queries` matches row i of `candidates`; the other rows are in-batch negatives."""
    q = F.normalize(queries, dim=-1)
    c = F.normalize(candidates, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * q @ c.T
    target = torch.arange(len(q))
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss
