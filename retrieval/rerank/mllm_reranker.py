"""The MLLM re-ranker in U-MARVEL's pointwise Yes/No form.

Query and candidate go into one user turn (each image before its text), followed by the
question; the model reads it causally, as it was pretrained to, and the score is P(Yes) from
the softmax over the "Yes" and "No" logits at the answer position. The binary logit
logit(Yes) - logit(No) is what training pushes (its sigmoid is that same P(Yes)), so it
trains with the same loss as the LiT cross-encoder. LoRA on the language model; the vision
tower stays frozen. Saved as `umr_reranker.json` (type mllm-yes-no, base folder, LoRA
settings) and `adapter.safetensors`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders.mllm import ADAPTER_FILE, MllmEncoder
from umr.retrieval.items import Item

CONFIG_FILE = "umr_reranker.json"
QUESTION = "Does the candidate match the query? Answer Yes or No."


class MllmReranker:
    kind = "mllm-yes-no"
    needs = "reads images as an hf-mllm encoder prepares them and needs an hf-mllm encoder"

    @staticmethod
    def accepts(encoder) -> bool:
        return isinstance(encoder, MllmEncoder)

    def __init__(self, encoder: MllmEncoder, path: str | None = None, provenance: dict | None = None):
        self.encoder = encoder
        self.path = path
        self.provenance = provenance or {}
        tok = encoder.tokenizer
        self.yes_id = tok.encode("Yes", add_special_tokens=False)[0]
        self.no_id = tok.encode("No", add_special_tokens=False)[0]
        if self.yes_id == self.no_id:
            raise InvalidArgument(f"{encoder.base}: 'Yes' and 'No' start with the same token; no Yes/No head")

    @classmethod
    def fresh(cls, base: str | Path, lora_r: int = 8, lora_alpha: int = 16) -> "MllmReranker":
        return cls(MllmEncoder(base, f"hf-mllm:{base}", lora={"r": lora_r, "alpha": lora_alpha}))

    @classmethod
    def load(cls, directory: str | Path) -> "MllmReranker":
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        enc = MllmEncoder(cfg["base"], f"hf-mllm:{cfg['base']}", cfg.get("lora"), load_file(str(directory / ADAPTER_FILE)))
        return cls(enc, str(directory), cfg.get("provenance"))

    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        directory = self.encoder.save_adapter(directory)
        cfg = {"type": self.kind, "base": str(self.encoder.base), "lora": self.encoder.lora, "question": QUESTION,
               "provenance": provenance or self.provenance}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    # -- the interface train_reranker and rerank use ---------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return self.encoder.trainable_parameters(learn_temperature=False)

    def train(self, on: bool) -> None:
        self.encoder.model.train(on)

    def prepare_training(self, items: list[Item], label: str) -> None:
        """Nothing to precompute: every step runs the model."""

    def logits(self, queries: list[Item], candidates: list[Item]) -> torch.Tensor:
        enc = self.encoder
        texts, images = [], []
        for q, c in zip(queries, candidates):
            pq, pc = enc.prepare(q), enc.prepare(c)
            images += [p.image for p in (pq, pc) if p.image is not None]
            content = enc.content(pq, "Query: ") + enc.content(pc, "Candidate: ") + [{"type": "text", "text": QUESTION}]
            texts.append(enc.chat(content, answer_prompt=True))
        batch = enc.inputs(texts, images)
        hidden = enc.hidden_states(batch, bidirectional=False)
        last = batch["attention_mask"].sum(1) - 1  # right padding: the answer position
        h = hidden[torch.arange(len(texts), device=hidden.device), last].float()
        head = enc.model.get_output_embeddings().weight[[self.yes_id, self.no_id]].float()
        two = h @ head.T
        return (two[:, 0] - two[:, 1]).cpu()

    @torch.inference_mode()
    def score(self, query: Item, candidates: list[Item], batch_size: int = 16) -> np.ndarray:
        """P(yes) for each candidate."""
        out = [torch.sigmoid(self.logits([query] * len(candidates[i : i + batch_size]), candidates[i : i + batch_size]))
               for i in range(0, len(candidates), batch_size)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, dtype=np.float32)
