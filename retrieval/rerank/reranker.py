"""A cross-encoder re-ranker for lit encoders: scores (query, candidate) jointly.

A dual encoder compares two pooled vectors; a function of those two vectors alone could add
nothing a better head could not. This model reads what pooling throws away: the text tower's
token states and the image tower's 7 x 7 feature map, of both sides at once, through a small
transformer, and answers P(match) (the pointwise Yes/No of U-MARVEL's re-ranker). Its score is
fused with the retriever's cosine as cos + w * P(yes).

Saved as a directory: `umr_reranker.json` (config, provenance) + `reranker.safetensors`.
"""
from __future__ import annotations

import json
import sys
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders import towers
from umr.retrieval.items import Item

CONFIG_FILE = "umr_reranker.json"
WEIGHTS_FILE = "reranker.safetensors"
TEXT_TOKENS = 32
IMAGE_TOKENS = towers.IMAGE_TOKENS


@dataclass(frozen=True)
class CrossConfig:
    dim: int = 256  # the lit heads' width, so the token projections can start from them
    layers: int = 2
    heads: int = 4
    ff: int = 256
    dropout: float = 0.1
    seed: int = 0


class CrossScorer(torch.nn.Module):
    """[CLS] + query tokens + candidate tokens -> one logit. Each token carries a type: query or
    candidate side, text or image part.

    The logit is a * cos(pooled query, pooled candidate) + b + the transformer's CLS output. With
    the token projections started from a dual encoder's heads and the CLS output at zero, the
    model starts as that dual encoder and learns token-level corrections: trained from scratch
    on a few thousand pairs, a cross-attention stack alone stays at chance."""

    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng():  # seeded weights without reseeding the caller's generator
            torch.manual_seed(cfg.seed)
            self._build(cfg)

    def _build(self, cfg: CrossConfig) -> None:
        self.text_in = torch.nn.Linear(towers.TEXT_DIM, cfg.dim)
        self.image_in = torch.nn.Linear(towers.IMAGE_DIM, cfg.dim)
        self.types = torch.nn.Embedding(4, cfg.dim)  # (query, candidate) x (text, image)
        self.text_pos = torch.nn.Embedding(TEXT_TOKENS, cfg.dim)
        self.image_pos = torch.nn.Embedding(IMAGE_TOKENS, cfg.dim)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, cfg.dim))
        layer = torch.nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ff, cfg.dropout, batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(cfg.dim)
        self.out = torch.nn.Linear(cfg.dim, 1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        self.cos_scale = torch.nn.Parameter(torch.tensor(10.0))
        self.cos_bias = torch.nn.Parameter(torch.tensor(-5.0))

    def init_from_heads(self, heads) -> None:
        """Token projections from a lit encoder's heads (same width): mean-pooled projected
        tokens are then that encoder's embeddings, up to the towers' own pooling."""
        with torch.no_grad():
            self.text_in.load_state_dict(heads.text_proj.state_dict())
            self.image_in.load_state_dict(heads.image_proj.state_dict())

    @staticmethod
    def _pooled(t: torch.Tensor, tm: torch.Tensor, i: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        def mean(x, m):
            w = m.unsqueeze(-1).float()
            return F.normalize((x * w).sum(1) / w.sum(1).clamp(min=1), dim=-1) * (m.any(1, keepdim=True).float())

        return F.normalize(mean(t, tm) + mean(i, im), dim=-1)

    def _side(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor,
              side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t0, i0 = self.text_in(text), self.image_in(image)
        pooled = self._pooled(t0, text_mask, i0, image_mask)
        t = t0 + self.text_pos.weight[: text.shape[1]] + self.types.weight[2 * side]
        i = i0 + self.image_pos.weight[: image.shape[1]] + self.types.weight[2 * side + 1]
        return torch.cat([t, i], 1), torch.cat([text_mask, image_mask], 1), pooled

    def forward(self, query: "Tokens", cand: "Tokens") -> torch.Tensor:
        q, qm, qp = self._side(*query.tensors(), side=0)
        c, cm, cp = self._side(*cand.tensors(), side=1)
        x = torch.cat([self.cls.expand(len(q), -1, -1), q, c], 1)
        keep = torch.cat([torch.ones(len(q), 1, dtype=torch.bool), qm, cm], 1)
        h = self.encoder(x, src_key_padding_mask=~keep)
        dual = self.cos_scale * (qp * cp).sum(-1) + self.cos_bias
        return dual + self.out(self.norm(h[:, 0])).squeeze(-1)


@dataclass
class Tokens:
    """A batch of items as padded token states: text (B x T x 384) and image (B x 49 x 1280)."""

    text: torch.Tensor
    text_mask: torch.Tensor
    image: torch.Tensor
    image_mask: torch.Tensor

    def tensors(self):
        return self.text.float(), self.text_mask, self.image.float(), self.image_mask


class TokenCache:
    """Token states per text and per image, computed once by the locked towers (bounded LRU:
    a server re-ranking the same popular documents keeps them)."""

    def __init__(self, max_items: int = 50_000):
        self.text_states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_items = max_items

    def fill(self, items: list[Item], batch_size: int = 32) -> None:
        texts = list(dict.fromkeys(it.text for it in items if it.text and it.text.strip() and it.text not in self.text_states))
        tt = towers.text_tower()
        for i in range(0, len(texts), 256):
            chunk = texts[i : i + 256]
            states, mask = tt.token_states(chunk, TEXT_TOKENS)
            for t, s, m in zip(chunk, states, mask):
                self._put(self.text_states, t, s[m].half())
        paths = list(dict.fromkeys(str(it.image) for it in items if isinstance(it.image, (str, Path))
                                   and str(it.image) not in self.image_states))
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            for path, fmap in zip(chunk, _feature_maps(chunk)):
                self._put(self.image_states, path, fmap.half())

    def _put(self, store: OrderedDict, key: str, value: torch.Tensor) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > self.max_items:
            store.popitem(last=False)

    def tokens(self, items: list[Item]) -> Tokens:
        """Paths are cached; a query's own image (a prepared tensor, PIL image or bytes) is
        computed for this call only."""
        self.fill(items)
        n = len(items)
        t_len = max([len(self.text_states[it.text]) for it in items if it.text and it.text.strip()] or [1])
        text = torch.zeros(n, t_len, towers.TEXT_DIM, dtype=torch.float16)
        text_mask = torch.zeros(n, t_len, dtype=torch.bool)
        has_image = any(it.image is not None for it in items)
        image = torch.zeros(n, IMAGE_TOKENS if has_image else 1, towers.IMAGE_DIM, dtype=torch.float16)
        image_mask = torch.zeros(n, image.shape[1], dtype=torch.bool)
        own = [r for r, it in enumerate(items) if it.image is not None and not isinstance(it.image, (str, Path))]
        if own:
            fresh = _feature_maps([items[r].image for r in own])
            for r, fmap in zip(own, fresh):
                image[r] = fmap.half()
                image_mask[r] = True
        for r, it in enumerate(items):
            if it.text and it.text.strip():
                s = self.text_states[it.text]
                text[r, : len(s)] = s
                text_mask[r, : len(s)] = True
            if isinstance(it.image, (str, Path)):
                image[r] = self.image_states[str(it.image)]
                image_mask[r] = True
        return Tokens(text, text_mask, image, image_mask)


def _feature_maps(images: list) -> torch.Tensor:
    """Paths, PIL images or bytes, or tensors already preprocessed for the image tower; paths
    and bytes through the on-disk feature cache, so a second `umr reranker` process over the
    same candidates runs no image tower."""
    return towers.image_tower().cached_feature_maps(images)


class LitReranker:
    kind = "lit-cross"
    needs = "reads the lit towers' token states and needs a lit encoder"

    @staticmethod
    def accepts(encoder) -> bool:
        from umr.retrieval.encoders.tower_encoder import TowerEncoder

        return isinstance(encoder, TowerEncoder)

    def __init__(self, model: CrossScorer, path: str | None = None, provenance: dict | None = None):
        self.model = model.eval()
        self.path = path
        self.provenance = provenance or {}
        self.cache = TokenCache()

    @classmethod
    def fresh(cls, cfg: CrossConfig | None = None, heads=None) -> "LitReranker":
        model = CrossScorer(cfg or CrossConfig())
        if heads is not None:
            model.init_from_heads(heads)
        return cls(model)

    @classmethod
    def load(cls, directory: str | Path) -> "LitReranker":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{directory} is not a umr re-ranker (no {CONFIG_FILE}); train one with `umr reranker train`")
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        if cfg.get("type") != "lit-cross" or cfg.get("text_tower") != towers.TEXT_TOWER:
            raise InvalidArgument(f"{directory}: a {cfg.get('type')!r} re-ranker over {cfg.get('text_tower')}, "
                             f"this umr has lit-cross over {towers.TEXT_TOWER}")
        model = CrossScorer(CrossConfig(**cfg["config"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return cls(model, str(directory), cfg.get("provenance"))

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(directory / WEIGHTS_FILE))
        os.chmod(directory / WEIGHTS_FILE, 0o644)
        cfg = {"type": "lit-cross", "text_tower": towers.TEXT_TOWER, "image_tower": towers.IMAGE_TOWER,
               "config": asdict(self.model.cfg), "provenance": provenance or self.provenance}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    # -- the interface train_reranker and rerank use ---------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def train(self, on: bool) -> None:
        self.model.train(on)

    def prepare_training(self, items: list[Item], label: str) -> None:
        """Token states of every training item, computed once: training revisits them every epoch."""
        from tqdm import tqdm

        self.cache.max_items = 10 ** 9
        step = 256
        with tqdm(total=len(items), unit="item", desc=f"token states ({label})", file=sys.stderr) as bar:
            for i in range(0, len(items), step):
                self.cache.fill(items[i : i + step])
                bar.update(len(items[i : i + step]))

    def logits(self, queries: list[Item], candidates: list[Item]) -> torch.Tensor:
        return self.model(self.cache.tokens(queries), self.cache.tokens(candidates))

    @torch.inference_mode()
    def score(self, query: Item, candidates: list[Item], batch_size: int = 64) -> np.ndarray:
        """P(yes) for each candidate."""
        out = []
        for i in range(0, len(candidates), batch_size):
            chunk = candidates[i : i + batch_size]
            q = self.cache.tokens([query] * len(chunk))
            c = self.cache.tokens(chunk)
            out.append(torch.sigmoid(self.model(q, c)).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def load_reranker(directory: str | Path):
    """A LiT cross-encoder or an MLLM Yes/No re-ranker, by what the folder says it holds."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a umr re-ranker (no {CONFIG_FILE}); train one with `umr reranker train`")
    if json.loads((directory / CONFIG_FILE).read_text()).get("type") == "mllm-yes-no":
        from umr.retrieval.rerank.mllm_reranker import MllmReranker

        return MllmReranker.load(directory)
    return LitReranker.load(directory)


def rerank(reranker, query: Item, hits: list, depth: int, weight: float, k: int, resolve) -> list:
    """Retrieve-then-rerank (U-MARVEL+): the top `depth` hits re-ordered by cos + w * P(yes);
    `resolve(doc)` gives a hit's document as an Item. Hits below `depth` keep their order."""
    from dataclasses import replace

    top, rest = hits[:depth], hits[depth:]
    if not top:
        return hits[:k]
    p_yes = reranker.score(query, [resolve(h.doc) for h in top])
    fused = fuse(np.array([h.score for h in top]), p_yes, weight)
    order = np.argsort(-fused, kind="stable")
    reranked = [replace(top[i], score=float(fused[i]), details={"cosine": top[i].score, "p_yes": float(p_yes[i])})
                for i in order]
    return (reranked + rest)[:k]


def fuse(cosines: np.ndarray, p_yes: np.ndarray, weight: float) -> np.ndarray:
    """U-MARVEL's teacher and U-MARVEL+'s final score: cos + w * P(yes)."""
    return np.asarray(cosines, dtype=np.float32) + weight * np.asarray(p_yes, dtype=np.float32)
