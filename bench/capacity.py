"""Would more trainable capacity than the heads lift the lit encoder on flickr8k-1k?

The recipe's stages train only the two linear heads over locked towers. This measures, on the
same data, split and stage (a) settings, what opening up more of the model buys: residual
bottleneck adapters on the pooled features, the image tower's last block (EfficientNet-Lite0's
1x1 conv head with its batch-norm affine, 410k weights), MiniLM's last transformer layer (1.8M
weights), or both. Tower layers learn at 0.3 x the heads' rate. Everything below the trained
layers is computed once and cached, as the recipe caches tower features.

These variants live here, not in `umr train`: none of them gained enough to earn a place in
the product (see docs/benchmarks.md, section capacity). Run: python bench/capacity.py [--seeds 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import figure, machine, write_section  # noqa: E402
from bench.recipe import FLICKR, M, log, recall  # noqa: E402
from umr.plots import bars  # noqa: E402

TEXT_TOKENS = 40
TOP_LR_SCALE = 0.3


class Adapter(torch.nn.Module):
    """x + W2 gelu(W1 x), W2 zero at the start: the head begins as the plain linear head."""

    def __init__(self, dim: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up, self.down = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        torch.nn.init.normal_(self.up.weight, std=dim ** -0.5, generator=g)
        for t in (self.up.bias, self.down.weight, self.down.bias):
            torch.nn.init.zeros_(t)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class ImageTop(torch.nn.Module):
    """EfficientNet-Lite0's conv head + batch-norm/ReLU6; running statistics stay frozen."""

    def __init__(self, model):
        super().__init__()
        self.conv, self.bn = copy.deepcopy(model.conv_head), copy.deepcopy(model.bn2)

    def forward(self, x):
        self.bn.eval()
        return self.bn(self.conv(x)).mean((2, 3))


class TopTrainee:
    """The trainee interface of training/trainees.py over cached below-the-top states."""

    def __init__(self, enc, bank, states, variant: str, seed: int, text_layer, image_model):
        self.enc, self.bank, self.s = enc, bank, states
        self.logit_scale = enc.heads.logit_scale
        self.text_top = copy.deepcopy(text_layer)
        self.image_top = ImageTop(image_model)
        self.adapt_t = Adapter(384, 512, seed) if variant == "adapters" else None
        self.adapt_i = Adapter(1280, 512, seed + 1) if variant == "adapters" else None
        self.train_text = variant in ("text-top", "both")
        self.train_image = variant in ("image-top", "both")
        self.extra = torch.nn.ModuleDict({k: m for k, m in [("text_top", self.text_top), ("image_top", self.image_top),
                                                            ("adapt_t", self.adapt_t), ("adapt_i", self.adapt_i)] if m})

    def parameters(self, trainable, learn_temperature):
        heads = [p for n, p in self.enc.heads.named_parameters() if learn_temperature or n != "logit_scale"]
        groups = [{"params": heads}]
        if self.adapt_t is not None:
            groups.append({"params": list(self.adapt_t.parameters()) + list(self.adapt_i.parameters())})
        tops = (list(self.text_top.parameters()) if self.train_text else []) + \
               (list(self.image_top.parameters()) if self.train_image else [])
        if tops:
            groups.append({"params": tops, "lr_scale": TOP_LR_SCALE, "weight_decay": 0.01})
        trained = {id(p) for g in groups for p in g["params"]}
        for p in list(self.enc.heads.parameters()) + list(self.extra.parameters()):
            p.requires_grad_(id(p) in trained)
        return groups

    def module(self):
        return torch.nn.ModuleDict({"heads": self.enc.heads, **self.extra})

    def train(self, on: bool):
        self.enc.heads.train(on)
        self.extra.train(on)

    def text_features(self, rows: torch.Tensor) -> torch.Tensor:
        mask = self.s["mask"][rows]
        bias = (1.0 - mask[:, None, None, :].float()) * -1e9
        out = self.text_top(self.s["text"][rows], attention_mask=bias)
        h = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1).float()
        f = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return self.adapt_t(f) if self.adapt_t is not None else f

    def image_features(self, rows: torch.Tensor) -> torch.Tensor:
        f = self.image_top(self.s["image"][rows])
        return self.adapt_i(f) if self.adapt_i is not None else f

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        heads = self.enc.heads
        return self.bank.fuse(ids, lambda rows: heads.text_proj(self.text_features(rows)),
                              lambda rows: heads.image_proj(self.image_features(rows)), heads.text_proj.out_features)


def below_the_top(bank, enc) -> dict:
    """MiniLM's input to its last layer (with the mask) and EfficientNet's input to its conv head."""
    from umr.retrieval.images import open_image

    text, mask, image = [], [], []
    texts, images = list(bank.texts), list(bank.images)
    m = enc.image.model
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            tok = enc.text.tokenizer(texts[i : i + 256], padding="max_length", truncation=True, max_length=TEXT_TOKENS,
                                     return_tensors="pt")
            text.append(enc.text.model(**tok, output_hidden_states=True).hidden_states[-2].clone())
            mask.append(tok["attention_mask"])
        for i in range(0, len(images), 32):
            batch = torch.stack([enc.image.preprocess(open_image(p, min_side=224)) for p in images[i : i + 32]])
            x = ((batch.float() - enc.image.mean) / enc.image.std).contiguous(memory_format=torch.channels_last)
            image.append(m.blocks(m.bn1(m.conv_stem(x))).contiguous().clone())
    return {"text": torch.cat(text), "mask": torch.cat(mask), "image": torch.cat(image)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.corpus.mbeir import read_pool, read_queries
    from umr.training.contrastive import ContrastiveConfig, train_examples
    from umr.training.examples import FeatureBank, pair_examples
    from umr.training.pairs import read_pairs

    t_start = time.perf_counter()
    bank = FeatureBank()
    examples = pair_examples(read_pairs(FLICKR / "captions.txt", split=f"{FLICKR / 'split.json'}:train"), bank)
    test_q = {"t2i": read_queries(M / "query/flickr8k_task0_test.jsonl"),
              "i2t": read_queries(M / "query/flickr8k_task3_test.jsonl")}
    test_pool = read_pool(M / "cand_pool/flickr8k_test_cand_pool.jsonl")
    for q in test_q["t2i"] + test_q["i2t"]:
        bank.item(q.item.text or None, q.item.image)
    for it in test_pool.values():
        bank.item(it.text or None, it.image)
    towers = load_encoder("lit-init:256:0", cache=False)
    t0 = time.perf_counter()
    states = below_the_top(bank, towers)
    log(f"cached states of {len(bank.texts)} texts and {len(bank.images)} images: {time.perf_counter() - t0:.0f}s")

    class TrainedBank:
        """bench.recipe.recall embeds through `bank.embed(enc.heads, ids)`; route it to the trainee."""

        def __init__(self, trainee):
            self.trainee = trainee

        def item(self, text=None, image=None):
            return bank.item(text, image)

        def embed(self, heads, ids):
            return self.trainee.embed(ids)

    variants = {"heads": "heads only (the recipe's stage (a))", "adapters": "+ residual adapters (512 hidden) on both sides",
                "image-top": "+ EfficientNet's conv head", "text-top": "+ MiniLM's last layer",
                "both": "+ MiniLM's last layer and EfficientNet's conv head"}
    results: dict[str, list] = {v: [] for v in variants}
    for seed in range(args.seeds):
        for v in variants:
            t0 = time.perf_counter()
            enc = load_encoder(f"lit-init:256:{seed}", cache=False)
            trainee = TopTrainee(enc, bank, states, v, seed, towers.text.model.encoder.layer[-1], towers.image.model)
            cfg = ContrastiveConfig(epochs=30, batch_size=128, lr=1e-3, weight_decay=0.5, seed=seed)
            train_examples(enc, bank, examples, cfg, trainee=trainee)
            with torch.no_grad():
                r = recall(enc, TrainedBank(trainee), test_q, test_pool)
            r["seconds"] = time.perf_counter() - t0
            results[v].append(r)
            log(f"seed {seed} {v}: t2i R@5 {r['t2i R@5']:.3f}  i2t R@5 {r['i2t R@5']:.3f}  {r['seconds']:.0f}s")

    cols = [f"{d} R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    rows = []
    for v, label in variants.items():
        cells = [f"{np.mean([r[c] for r in results[v]]):.3f} ± {np.std([r[c] for r in results[v]]):.3f}" for c in cols]
        secs = np.median([r["seconds"] for r in results[v]])
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {secs:.0f} |")
    gain = {v: {d: np.mean([r[f"{d} R@5"] for r in results[v]]) - np.mean([r[f"{d} R@5"] for r in results["heads"]])
                for d in ("t2i", "i2t")} for v in variants}
    best = max(variants, key=lambda v: min(gain[v].values()))
    def r5(stat, direction):
        return {v: float(stat([r[f"{direction} R@5"] for r in results[v]])) for v in variants}

    plot = figure("capacity", bars, {"text -> image": r5(np.mean, "t2i"), "image -> text": r5(np.mean, "i2t")},
                  errors={"text -> image": r5(np.std, "t2i"), "image -> text": r5(np.std, "i2t")},
                  ylabel=f"Recall@5, mean ± std over {args.seeds} seeds", highlight="heads",
                  title="Stage (a) with more of the model trainable (flickr8k-1k test split)")
    body = f"""## Trainable capacity beyond the heads (`bench/capacity.py`)

Stage (a) of the recipe (30 epochs, lr 1e-3 one-cycle, batch 128, weight decay 0.5, symmetric InfoNCE, fresh 256-d
heads) on the 800 flickr8k-1k training photos, with more of the model trainable; tower layers at {TOP_LR_SCALE} x the
heads' lr, weight decay 0.01, inputs below them cached (MiniLM at {TEXT_TOKENS} tokens). Test split, local pools;
mean ± std over {args.seeds} seeds. {machine()}; whole run {time.perf_counter() - t_start:.0f}s.

| trainable | {" | ".join(cols)} | training s (median) |
|---|{"---|" * len(cols)}---|
{chr(10).join(rows)}

Recall@5 over heads only: {", ".join(f"{v} {gain[v]['t2i']:+.3f} / {gain[v]['i2t']:+.3f}" for v in variants if v != "heads")}
(text->image / image->text). Largest gain in the worse direction: {best}.

{plot}
"""
    write_section("capacity", body)


if __name__ == "__main__":
    main()
