"""Contrastive losses over cosine similarities scaled by a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
             symmetric: bool = True, same: torch.Tensor | None = None) -> torch.Tensor:
    """Row i of `queries` matches row i of `candidates`; the other rows are in-batch negatives.

    `same` (B x B, bool) marks further pairs that are positives too, e.g. two images that
    share a class-name caption: counting them as negatives would push apart what matches.
    """
    q = F.normalize(queries, dim=-1)
    c = F.normalize(candidates, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * q @ c.T
    if same is None:
        target = torch.arange(len(q))
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = (loss + F.cross_entropy(logits.T, target)) / 2
        return loss
    pos = same | torch.eye(len(q), dtype=torch.bool)

    def multi_positive(lg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~mask, float("-inf")), 1)).mean()

    loss = multi_positive(logits, pos)
    if symmetric:
        loss = (loss + multi_positive(logits.T, pos.T)) / 2
    return loss


def embedding_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine to a frozen previous model's embedding (QDC's continual-learning term)."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()
