"""The concept bridge: an image embedded in MiniLM's space through the 1,000 ImageNet concepts
EfficientNet-Lite0 was trained to recognise (ConSE: Norouzi et al., ICLR 2014).

An image's vector is the probability-weighted mean of the text embeddings of its top-k classes,
so it needs no training and carries every ImageNet concept, where heads trained on 800 Flickr
photos know only Flickr's. A class's text is each WordNet synonym in "a photo of a {synonym}."
and the class's WordNet definition ("sweatshirt: cotton knit pullover with long sleeves."), all
embedded by MiniLM and averaged: the definitions help every measured set (docs/zero-shot.md).
"""
from __future__ import annotations

import torch

TOP_K = 10
TEMPERATURE = 1.0


def class_texts() -> list[list[str]]:
    """Per ImageNet class (in the classifier's order), the texts whose embeddings it averages."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    out = []
    for i in range(info.num_classes()):
        names, _, definition = info.index_to_description(i, detailed=True).partition(":")
        synonyms = [s.strip() for s in names.split(",") if s.strip()]
        texts = [f"a photo of a {s}." for s in synonyms]
        if definition.strip():
            texts.append(f"{synonyms[0]}: {definition.strip()}.")
        out.append(texts)
    return out


def class_embeddings(text_tower, texts: list[list[str]] | None = None) -> torch.Tensor:
    """(classes x 384) unit rows: each class's texts embedded by MiniLM, averaged."""
    texts = texts or class_texts()
    flat = [t for ts in texts for t in ts]
    owner = torch.tensor([c for c, ts in enumerate(texts) for _ in ts])
    feats = text_tower.cached_features(flat)
    sums = torch.zeros(len(texts), feats.shape[1]).index_add_(0, owner, feats)
    return torch.nn.functional.normalize(sums, dim=-1)


def bridge(logits: torch.Tensor, class_emb: torch.Tensor, top_k: int = TOP_K,
           temperature: float = TEMPERATURE) -> torch.Tensor:
    """Unit rows in the class embeddings' space: the softmax over the logits, kept on the top k
    classes and renormalised, weighting the class embeddings."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    top = torch.topk(p, min(top_k, p.shape[-1]), dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True)
    return torch.nn.functional.normalize(torch.einsum("bk,bkd->bd", w, class_emb[top.indices]), dim=-1)
