"""Token ids of many texts at once, on several threads.

A fast tokenizer's Rust encoder releases the GIL, but the Hugging Face wrapper keeps its
truncation and padding settings on the one backend every caller shares, so it is called one
thread at a time (serial.py). One call of 512 Flickr captions took 15-22 ms that way on this
machine (23-34k texts/s): on a GPU, where MiniLM's forward on them takes a few milliseconds,
that thread alone held texts under issue 25's 30,000/s. Here every thread encodes with a copy
of the backend it alone holds, with the settings of its own call, and one call's texts are
split across the threads.

The copies must tokenise as the wrapper does. `BulkTokenizer.parallel` compares them with the
wrapper once per tokenizer on a probe and, where they differ (a slow tokenizer, a wrapper that
edits its input in Python), calls the wrapper instead.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from umr.retrieval.device import default_workers

# Below this many texts per thread, handing a slice to another thread costs more than it saves.
MIN_SHARD = 64
PROBE = ["a dog runs on the grass", "", "  Two CHILDREN play   in the water near a large rock at the beach. ",
         "naïve café — 東京 🚗", "word " * 300]


class BulkTokenizer:
    """A shared tokenizer's ids and padded batches, as its wrapper gives them
    (`truncation=True, max_length=max_tokens`), with one call's texts split across `threads`
    threads when its copies tokenise as the wrapper does, else from the wrapper itself."""

    def __init__(self, tokenizer, threads: int | None = None):
        self.wrapper = tokenizer  # serial.py's wrapper: the fallback, one call at a time
        target = getattr(tokenizer, "unwrapped", tokenizer)
        backend = getattr(target, "backend_tokenizer", None)
        self.source = backend.to_str() if backend is not None else None
        self.side = getattr(target, "truncation_side", "right")
        self.pad_side = getattr(target, "padding_side", "right")
        self.pad_id = getattr(target, "pad_token_id", None) or 0
        self.with_types = "token_type_ids" in getattr(target, "model_input_names", ())
        self.threads = max(1, threads or default_workers())
        self._free: list = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._same: bool | None = None

    @property
    def parallel(self) -> bool:
        """Whether the copies tokenise as the wrapper does (checked once, on PROBE)."""
        if self._same is None:
            try:
                self._same = self.source is not None and all(
                    self._split(PROBE, m) == self.wrapper(PROBE, truncation=True, max_length=m)["input_ids"]
                    for m in (8, 128))
            except Exception:  # noqa: BLE001 - any failure means: keep the wrapper
                self._same = False
        return self._same

    def ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        if not self.parallel:
            return self.wrapper(texts, truncation=True, max_length=max_tokens)["input_ids"]
        return self._split(texts, max_tokens)

    def padded(self, texts: list[str], max_tokens: int, multiple: int = 1) -> dict[str, torch.Tensor]:
        """The wrapper's `padding=True, return_tensors="pt"` batch, the width rounded up to
        `multiple` (on a GPU, so that calls meet a few shapes, not one per longest text)."""
        if not self.parallel:
            return dict(self.wrapper(texts, padding=True, truncation=True, max_length=max_tokens,
                                     pad_to_multiple_of=multiple if multiple > 1 else None, return_tensors="pt"))
        return self._pad(self._split(texts, max_tokens), multiple)

    def _split(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        shards = min(self.threads, len(texts) // MIN_SHARD)
        if shards <= 1:
            return self._encode(texts, max_tokens)
        step = -(-len(texts) // shards)
        parts = [texts[i : i + step] for i in range(0, len(texts), step)]
        out: list[list[int]] = []
        for part in self._executor().map(self._encode, parts, [max_tokens] * len(parts)):
            out.extend(part)
        return out

    def _pad(self, ids: list[list[int]], multiple: int = 1) -> dict[str, torch.Tensor]:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        width = int(lengths.max(initial=0))
        width = -(-width // multiple) * multiple
        columns = np.arange(width)
        # Row-major order of the kept cells is the order of the ids, on either side.
        real = columns < lengths[:, None] if self.pad_side == "right" else columns >= (width - lengths)[:, None]
        tokens = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        tokens[real] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        out = {"input_ids": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(real.astype(np.int64))}
        if self.with_types:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def _encode(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        backend = self._take()
        try:
            backend.enable_truncation(max_tokens, direction=self.side)
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no character offsets
            return [e.ids for e in encode(texts)]
        finally:
            with self._lock:
                self._free.append(backend)

    def _take(self):
        """A backend no other call holds: a free one, or a new copy (as many exist as calls ever
        ran at once: the threads here plus the callers)."""
        with self._lock:
            if self._free:
                return self._free.pop()
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.source)
        backend.no_padding()
        return backend

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="umr-tokenize")
            return self._pool
