"""Fine-tuning a Hugging Face text encoder (hf-text) on text pairs, with optional distillation
toward the frozen previous model: the text side of continual updates (QDC's setting)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from umr.retrieval.encoders.base import mean_pool
from umr.training.losses import embedding_distillation, info_nce


def _embed(model, tokenizer, texts, max_tokens=128):
    tok = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return mean_pool(model(**tok).last_hidden_state, tok["attention_mask"])


def finetune_text(path: str | Path, pairs: list[tuple[str, str]], out: str | Path, *, epochs: int = 1,
                  batch_size: int = 32, lr: float = 3e-5, temperature: float = 0.05, distill_weight: float = 0.0,
                  max_steps: int | None = None, seed: int = 0) -> list[float]:
    """InfoNCE over (query, positive) pairs with in-batch negatives; saves a folder `hf-text:OUT` loads."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).train()
    teacher = AutoModel.from_pretrained(str(path)).eval() if distill_weight > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scale = torch.tensor(float(np.log(1 / temperature)))
    losses, step = [], 0
    for _ in range(epochs):
        if max_steps and step >= max_steps:
            break
        order = rng.permutation(len(pairs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = [pairs[j] for j in order[i : i + batch_size]]
            q = _embed(model, tokenizer, [b[0] for b in batch])
            d = _embed(model, tokenizer, [b[1] for b in batch])
            loss = info_nce(q, d, scale)
            if teacher is not None:
                with torch.no_grad():
                    tq = _embed(teacher, tokenizer, [b[0] for b in batch])
                    td = _embed(teacher, tokenizer, [b[1] for b in batch])
                loss = loss + distill_weight * (embedding_distillation(q, tq) + embedding_distillation(d, td))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps and step >= max_steps:
                break
    model.eval().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return losses
