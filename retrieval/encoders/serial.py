"""Tokenizers and processors shared by threads, called one thread at a time.

A Hugging Face fast tokenizer keeps its padding and truncation settings on the Rust backend
it shares with every caller: each call first sets them, then encodes. Two threads calling it
with different settings (the tower's packed path asks for no padding, the padded path for
padding) can each encode with the other's settings: a query embedded from padded ids is a
different vector (cosine 0.73-0.99 to its solo encoding, measured), and an unpadded batch
asked for as a tensor fails with "Unable to create tensor". The server embeds documents on
worker threads beside the batcher's thread, so this happened under ordinary load.

Tokenising takes microseconds per text against milliseconds for the forward that follows,
so a lock around it costs nothing measurable (bench/concurrency.py compares it with one
tokenizer per thread), and unlike per-thread copies it also covers tokenizers that a later
call changes (special tokens an MLLM encoder adds).
"""
from __future__ import annotations

import inspect
import threading


class Serial:
    """`target` (a tokenizer or a processor) with every call and method call under `lock`.

    Attributes that are not methods (`pad_token_id`, a processor's `image_processor`) are
    read through unchanged; assignments go to the target. Several wrappers may share one lock
    when their targets share state (a processor and its own tokenizer)."""

    def __init__(self, target, lock: threading.RLock | None = None):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_lock", lock or threading.RLock())

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def unwrapped(self):
        return self._target

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._target(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if not (inspect.ismethod(value) or inspect.isbuiltin(value)):
            return value
        lock = self._lock

        def locked(*args, **kwargs):
            with lock:
                return value(*args, **kwargs)

        return locked

    def __setattr__(self, name: str, value) -> None:
        with self._lock:
            setattr(self._target, name, value)

    def __len__(self) -> int:
        with self._lock:
            return len(self._target)


def serial(target, lock: threading.RLock | None = None) -> Serial:
    """`target` wrapped once (a wrapper is returned as it is)."""
    return target if isinstance(target, Serial) else Serial(target, lock)
