"""Sequence packing for a BERT-style text tower: several texts share one row of tokens.

Padding a batch to its longest text spends most of the forward on padding when lengths vary
(Flickr8k captions: 15 tokens on average, 30-40 for the longest of 32), and the linear layers
cost per token, padding or not. Texts are packed first-fit into rows of ROW_TOKENS, each token
attends only to its own text (a block-diagonal mask), positions restart per text, and the
mean pool runs per text. The answer is the padded forward's to float rounding (1e-7); on the
2-core machines here a batch of 32 captions runs 1.4x faster, 256 1.9x (docs/benchmarks.md,
section kernels).

It calls the model's embedding and layer modules directly, so it depends on how a transformers
release passes the mask; `check` compares it with the padded forward once per model and the
tower falls back to padding when they disagree.
"""
from __future__ import annotations

import torch

ROW_TOKENS = 128  # long enough to hold several captions, short enough that attention stays cheap
MIN_TEXTS = 4  # below this there is little padding to save and the mask costs more than it saves


def rows_of(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: text indices per row, no row over `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if left >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@torch.inference_mode()
def packed_mean_pool(model, ids: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Mean-pooled last hidden states (n, hidden) of the token id lists, packed into rows."""
    lengths = [len(x) for x in ids]
    rows = rows_of(lengths, max(ROW_TOKENS, max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            tokens[r, at : at + n] = torch.tensor(ids[i])
            positions[r, at : at + n] = torch.arange(n)
            owner[r, at : at + n] = i
            at += n
    # Each token sees its own text; a padding slot sees itself only, so no row of the mask is empty.
    allowed = (owner[:, :, None] == owner[:, None, :]) | torch.eye(width, dtype=torch.bool)
    hidden = model.embeddings(input_ids=tokens, position_ids=positions, token_type_ids=torch.zeros_like(tokens))
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill_(~allowed, torch.finfo(hidden.dtype).min)[:, None]
    for layer in model.encoder.layer:
        hidden = layer(hidden, attention_mask=mask)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    real = owner >= 0
    sums = torch.zeros((len(ids), hidden.shape[-1]), dtype=hidden.dtype).index_add_(0, owner[real], hidden[real])
    return sums / torch.tensor(lengths, dtype=hidden.dtype)[:, None]


def check(model, tokenizer, padded_mean_pool) -> bool:
    """Whether packing gives the padded forward's answer with this model and transformers."""
    probe = ["a dog runs on the grass", "two children play in the water near a large rock at the beach",
             "a man", "a red car parked beside a tall building on a quiet street", "people"]
    try:
        got = packed_mean_pool(model, tokenizer(probe, truncation=True)["input_ids"], tokenizer.pad_token_id or 0)
    except Exception:  # noqa: BLE001 - any failure means: use the padded forward
        return False
    want = padded_mean_pool(probe)
    return got.shape == want.shape and bool(torch.allclose(got, want, atol=1e-5))
