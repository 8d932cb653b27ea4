"""How much a photo looks like the photos a learned part was trained on.

A map trained on 800 Flickr photos places every photo among Flickr's captions, so added to the
concept bridge everywhere it costs the bridge its breadth (docs/zero-shot.md). The gate lets it
speak only where it was trained: a photo's closeness is the mean cosine between its pooled
features and its `knn` nearest training photos, and the gate is a sigmoid centred on a low
percentile of the training photos' own (leave-one-out) closeness. Flickr test photos sit near 1,
product photos and the sample's moon or coffee near 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umr.index.errors import InvalidArgument

KNN = 5
PERCENTILE = 5.0  # the centre: 95% of the training photos pass at least halfway
WIDTH = 0.03  # cosine units from half open to 73% open
MAX_ANCHORS = 4096  # the gate costs anchors x 1280 per photo; EfficientNet-Lite0 costs ~400M


def closeness(feats: torch.Tensor, anchors: torch.Tensor, knn: int = KNN, leave_one_out: bool = False,
              chunk: int = 1024) -> torch.Tensor:
    """Mean cosine to the `knn` nearest anchors (unit rows); with `leave_one_out`, `feats` are
    the anchors themselves and each row skips itself."""
    if len(anchors) == 0:
        return torch.full((len(feats),), -1.0)
    k = min(knn, len(anchors) - int(leave_one_out))
    if k < 1:
        return torch.full((len(feats),), -1.0)
    out = []
    for s in range(0, len(feats), chunk):
        sim = F.normalize(feats[s:s + chunk].float(), dim=-1) @ anchors.T
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + s] = -2.0
        out.append(torch.topk(sim, k, dim=-1).values.mean(-1))
    return torch.cat(out)


def pick_anchors(feats: torch.Tensor, limit: int = MAX_ANCHORS, seed: int = 0) -> torch.Tensor:
    """Unit rows of the distinct training photos, an even random sample of them past `limit`."""
    feats = torch.unique(F.normalize(feats.float(), dim=-1), dim=0)
    if len(feats) > limit:
        g = torch.Generator().manual_seed(seed)
        feats = feats[torch.randperm(len(feats), generator=g)[:limit].sort().values]
    return feats.contiguous()


def fit_center(anchors: torch.Tensor, knn: int = KNN, percentile: float = PERCENTILE) -> float:
    """The closeness below which only `percentile`% of the training photos fall."""
    if len(anchors) <= knn:
        raise InvalidArgument(f"the domain gate needs more than {knn} distinct training photos, got {len(anchors)}")
    return float(torch.quantile(closeness(anchors, anchors, knn, leave_one_out=True), percentile / 100))


def gate(feats: torch.Tensor, anchors: torch.Tensor, center: float, width: float = WIDTH,
         knn: int = KNN) -> torch.Tensor:
    """(B,) in [0, 1]: 0 everywhere when there are no anchors (nothing was trained)."""
    if len(anchors) == 0:
        return torch.zeros(len(feats))
    return torch.sigmoid((closeness(feats, anchors, knn) - center) / width)
