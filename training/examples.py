"""Training examples over cached tower features, for every kind of stage data.

The LiT towers are locked, so each distinct text and image goes through its tower once and the
heads train on cached features. An item is a row of the bank: a text feature, an image feature,
or both (fused as the encoder fuses them: the normalised sum). Pairs, caption pairs, M-BEIR
queries with mined negatives and teacher lists all become `Example`s over items.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders.base import with_instruction
from umr.retrieval.encoders.lit import LitHeads
from umr.retrieval.encoders.tower_encoder import TowerEncoder
from umr.retrieval.items import Item
from umr.retrieval.corpus.mbeir import Instructions, MbeirQuery
from umr.training.pairs import Pair


@dataclass
class Example:
    queries: np.ndarray  # item ids of the query's variants (the captions of one image, or one query)
    positives: np.ndarray  # item ids; empty: a second variant of `queries` is the positive (caption pairs)
    negatives: np.ndarray  # mined hard negatives, best first
    teacher_items: np.ndarray | None = None  # distillation: the candidate list ...
    teacher_scores: np.ndarray | None = None  # ... and the teacher's fused scores for it


class FeatureBank:
    """Distinct texts and images, their tower features, and items built from them."""

    def __init__(self):
        self.texts: dict[str, int] = {}
        self.images: dict[str, int] = {}
        self._items: dict[tuple[int, int], int] = {}
        self.item_text: list[int] = []
        self.item_image: list[int] = []
        self.text_feats: torch.Tensor | None = None
        self.image_feats: torch.Tensor | None = None

    def item(self, text: str | None = None, image: str | None = None) -> int:
        t = self.texts.setdefault(text, len(self.texts)) if text else -1
        i = self.images.setdefault(str(image), len(self.images)) if image else -1
        if t < 0 and i < 0:
            raise InvalidArgument("a training item needs a text or an image")
        key = (t, i)
        if key not in self._items:
            self._items[key] = len(self.item_text)
            self.item_text.append(t)
            self.item_image.append(i)
        return self._items[key]

    @classmethod
    def from_features(cls, text_feats: torch.Tensor, image_feats: torch.Tensor) -> "FeatureBank":
        """A bank over features computed elsewhere: text row r is item r, image row r is item
        len(texts) + r."""
        bank = cls()
        bank.text_feats, bank.image_feats = text_feats, image_feats
        bank.item_text = list(range(len(text_feats))) + [-1] * len(image_feats)
        bank.item_image = [-1] * len(text_feats) + list(range(len(image_feats)))
        return bank

    def compute(self, encoder: TowerEncoder, progress: Callable[[str, int], None] | None = None) -> None:
        """Tower features for every text and image not computed yet, through the on-disk
        feature cache, so a second process over the same data starts training at once."""
        texts = list(self.texts)
        images = list(self.images)
        have_t, have_i = self._computed()
        if len(texts) > have_t:
            new_t = encoder.text.cached_features(texts[have_t:], progress=progress and (lambda n: progress("texts", n)))
            self.text_feats = torch.cat(([self.text_feats] if have_t else []) + [new_t])
        if len(images) > have_i:
            try:
                new_i = encoder.image.cached_features(images[have_i:],
                                                      progress=progress and (lambda n: progress("images", n)))
            except ValueError as e:
                raise InvalidArgument(f"training {e}") from None
            self.image_feats = torch.cat(([self.image_feats] if have_i else []) + [new_i])

    def _computed(self) -> tuple[int, int]:
        return (0 if self.text_feats is None else len(self.text_feats),
                0 if self.image_feats is None else len(self.image_feats))

    def pending(self) -> int:
        have_t, have_i = self._computed()
        return len(self.texts) - have_t + len(self.images) - have_i

    def embed(self, heads: LitHeads, ids: np.ndarray) -> torch.Tensor:
        """Unit rows through the heads over the cached tower features."""
        return self.fuse(ids, lambda rows: heads.text_proj(self.text_feats[rows]),
                         lambda rows: heads.image_proj(self.image_feats[rows]), heads.text_proj.out_features)

    def fuse(self, ids: np.ndarray, text_vectors: Callable, image_vectors: Callable, dim: int) -> torch.Tensor:
        """Unit rows for items, given how to embed text and image rows of the bank; an
        image+text item is the normalised sum of its normalised parts, as the encoder fuses them."""
        t = np.asarray(self.item_text)[ids]
        im = np.asarray(self.item_image)[ids]
        out = torch.zeros(len(ids), dim)
        has_t, has_i = np.flatnonzero(t >= 0), np.flatnonzero(im >= 0)
        if len(has_t):
            tv = F.normalize(text_vectors(torch.from_numpy(t[has_t])), dim=-1)
            out = out.index_put((torch.from_numpy(has_t),), tv, accumulate=True)
        if len(has_i):
            iv = F.normalize(image_vectors(torch.from_numpy(im[has_i])), dim=-1)
            out = out.index_put((torch.from_numpy(has_i),), iv, accumulate=True)
        return F.normalize(out, dim=-1)


def _ids(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def pair_examples(pairs: list[Pair], bank: FeatureBank, kind: str = "image-caption") -> list[Example]:
    """One example per image: its captions are the query variants; the positive is the image,
    or (caption-caption) another caption of the same image."""
    by_image: dict[str, list[int]] = {}
    for p in pairs:
        by_image.setdefault(p.image, []).append(bank.item(text=p.text))
    out = []
    for image in sorted(by_image):
        caps = _ids(by_image[image])
        if kind == "caption-caption":
            if len(caps) >= 2:
                out.append(Example(caps, _ids([]), _ids([])))
        else:
            out.append(Example(caps, _ids([bank.item(image=image)]), _ids([])))
    return out


def _pool_item(bank: FeatureBank, item: Item) -> int:
    return bank.item(text=item.text if item.text and item.text.strip() else None, image=item.image)


def mbeir_examples(queries: list[MbeirQuery], pool: dict[str, Item], bank: FeatureBank,
                   instructions: Instructions | None = None, seed: int = 0,
                   join: Callable[[str | None, str | None], str | None] = with_instruction) -> tuple[list[Example], dict]:
    """One example per query. Positives and negatives missing from the pool are dropped and
    counted; a query left with no positive is skipped and counted. `join` puts the instruction
    into the query text the way the trained encoder does (`Encoder.with_instruction`)."""
    rng = np.random.default_rng(seed)
    out, stats = [], {"queries": len(queries), "skipped (no positive in the pool)": 0, "negatives": 0,
                      "teacher lists": 0}
    for q in queries:
        pos = [_pool_item(bank, pool[d]) for d in q.positives if d in pool]
        if not pos:
            stats["skipped (no positive in the pool)"] += 1
            continue
        target = pool[next(d for d in q.positives if d in pool)].modality
        instruction = instructions.pick(q.dataset_id, q.item.modality, target, rng) if instructions else None
        qid = bank.item(text=join(q.item.text, instruction), image=q.item.image)
        negs = [_pool_item(bank, pool[d]) for d in q.negatives if d in pool]
        stats["negatives"] += len(negs)
        ex = Example(_ids([qid]), _ids(pos), _ids(negs))
        teacher = q.record.get("teacher_list")
        if teacher:
            kept = [(t["did"], float(t["teacher"])) for t in teacher if t["did"] in pool]
            ex.teacher_items = _ids([_pool_item(bank, pool[d]) for d, _ in kept])
            ex.teacher_scores = np.array([s for _, s in kept], dtype=np.float32)
            stats["teacher lists"] += 1
        out.append(ex)
    if not out:
        raise InvalidArgument("no training query has a positive in the pool: check that --pool matches the queries")
    return out, stats


def compute_with_progress(bank: FeatureBank, encoder: TowerEncoder, label: str) -> None:
    n = bank.pending()
    if not n:
        return
    from tqdm import tqdm

    from umr.training.distributed import is_main

    bar = tqdm(total=n, unit="item", desc=f"tower features ({label})", file=sys.stderr, disable=not is_main())
    bank.compute(encoder, lambda kind, k: bar.update(k))
    bar.close()

