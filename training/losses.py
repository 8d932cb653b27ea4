"""Contrastive and distillation losses over cosine similarities scaled by a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
             symmetric: bool = True, same: torch.Tensor | None = None,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Row i of `queries` matches row i of `candidates`; the other rows are in-batch negatives.

    `negatives` (N x d) are further candidates every query is scored against (mined hard
    negatives, pooled over the batch as U-MARVEL gathers them). `same` (B x B, or B x (B+N) with
    negatives) marks further pairs that are positives too, e.g. two images that share a
    class-name caption, or a mined "negative" that is another query's labelled positive:
    counting them as negatives would push apart what matches. The symmetric term (candidate ->
    query) runs over the in-batch block only.
    """
    q = F.normalize(queries, dim=-1)
    c = F.normalize(candidates, dim=-1)
    b = len(q)
    if negatives is not None and len(negatives):
        c = torch.cat([c, F.normalize(negatives, dim=-1)])
    logits = logit_scale.exp().clamp(max=100) * q @ c.T
    if same is None and len(c) == b:
        target = torch.arange(b)
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = (loss + F.cross_entropy(logits.T, target)) / 2
        return loss
    pos = torch.zeros(b, len(c), dtype=torch.bool)
    pos[:, :b] = torch.eye(b, dtype=torch.bool)
    if same is not None:
        pos[:, : same.shape[1]] |= same

    def multi_positive(lg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~mask, float("-inf")), 1)).mean()

    loss = multi_positive(logits, pos)
    if symmetric:
        loss = (loss + multi_positive(logits[:, :b].T, pos[:, :b].T)) / 2
    return loss


def embedding_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine to a frozen previous model's embedding (QDC's continual-learning term)."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def listwise_kl(student_cos: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over each query's candidate list (U-MARVEL's distillation).

    Student logits are cos / temperature; teacher logits are (fused score / 2) / temperature with
    the temperature detached, the fused score being cos + w * P(yes) (so /2 keeps it on the
    cosine's scale). `mask` marks the real entries of padded lists.
    """
    scale = logit_scale.exp().clamp(max=100)
    s = (scale * student_cos).masked_fill(~mask, float("-inf"))
    t = (scale.detach() * teacher_scores / 2).masked_fill(~mask, float("-inf"))
    log_p_t = F.log_softmax(t, 1)
    log_p_s = F.log_softmax(s, 1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).masked_fill(~mask, 0.0).sum(1)
    return kl.mean()


def margin_mse(student_cos: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al.): the student's score margins between the teacher's best
    candidate and each other one match the teacher's margins (teacher scores halved, as above)."""
    t = teacher_scores / 2
    best = t.masked_fill(~mask, float("-inf")).argmax(1, keepdim=True)
    s_margin = student_cos.gather(1, best) - student_cos
    t_margin = t.gather(1, best) - t
    keep = mask.clone()
    keep.scatter_(1, best, False)
    return ((s_margin - t_margin) ** 2).masked_select(keep).mean()
