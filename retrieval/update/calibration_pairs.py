"""Calibration pairs for `umr update`: the same items embedded by a segment's encoder and by
the new one, from the sources a user names (or the defaults).

    corpus      the segment's stored documents: the old side is the stored vector, so only the
                new encoder runs
    passages    query-sized sentences of the stored multi-sentence texts, through both encoders
    generic     umr's generic queries nearest the segment's documents, through both encoders:
                text calibration for a segment with no texts of its own (a photo library)
    FILE.jsonl  queries of the user's ({"text", "image"} per line), through both encoders

A modality no source gives pairs for is filled where it can be: text from `generic` (by
default), image+text by pairing calibration images with calibration texts.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umr.index.documents import MODALITY_CODES
from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore, Segment
from umr.retrieval.encoders import Encoder, load_recorded
from umr.retrieval.update.generic_queries import generic_queries
from umr.retrieval.items import Item, stored_item

MIN_PAIRS = 20
DEFAULT_CALIBRATION = ("corpus", "passages")
QUERY_MODALITIES = ("text", "image", "image,text")
# Generic text calibration: the pool embedded by the old encoder, the segment documents that
# pick from it, and how many of their nearest pool queries each picks (docs/benchmarks.md,
# section continual: nearness to the corpus keeps the map where the segment's queries are).
GENERIC_POOL = 5000
GENERIC_ANCHORS = 2000
GENERIC_PER_DOCUMENT = 10
COMBINED_PAIRS = 500


def corpus_pairs(store: IndexStore, seg: Segment, new: Encoder, per_modality: int, seed: int = 0):
    """(modality -> (new vectors, old vectors)) from the segment's own stored documents, and
    the items embedded (modality -> items)."""
    rng = np.random.default_rng(seed)
    by_mod: dict[str, list] = defaultdict(list)
    for doc in store.docs.iter_docs(seg.id):
        by_mod[doc.modality].append(doc)
    out, items = {}, {}
    for modality, docs in by_mod.items():
        if len(docs) > per_modality:
            docs = [docs[i] for i in sorted(rng.choice(len(docs), per_modality, replace=False))]
        # Beside a running server a document may be deleted, or replaced into a newer segment,
        # between the listing and here: only those still in this segment pair up.
        found = {d.id: store.docs.get(d.id) for d in docs}
        docs = [d for d in docs if found[d.id] is not None and found[d.id][1] == seg.id]
        if not docs:
            continue
        rows = np.array([found[d.id][2] for d in docs])
        old = store.docs.vectors_at(seg.id, rows)
        store.docs.check_numbering(seg.id, seg.epoch)  # `get` numbers rows as the store does now
        items[modality] = [stored_item(store.path, d) for d in docs]
        out[modality] = (new.encode(items[modality], role="document"), old)
    return out, items


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def passages(text: str | None, min_words: int = 4, max_words: int = 40) -> list[str]:
    """The sentences of a multi-sentence text, the size of a query. A one-sentence text (a
    caption) yields nothing: it is already calibrated as the document itself."""
    if not text:
        return []
    found = [s.strip() for s in _SENTENCE_END.split(text) if min_words <= len(s.split()) <= max_words]
    return found if len(found) >= 2 else []


def passage_pairs(store: IndexStore, seg: Segment, old: Encoder, new: Encoder, limit: int, seed: int = 0):
    """Query-sized calibration from the corpus: sentences of the segment's stored texts,
    embedded by both encoders. Queries are short and documents long; a map fitted on whole
    documents alone transfers less well to queries (bench/continual_text.py: Cranfield
    abstracts vs its questions, 85% of the gap recovered from documents, 97% with passages)."""
    found = [p for doc in store.docs.iter_docs(seg.id) for p in passages(doc.text)]
    if not found:
        return {}
    rng = np.random.default_rng(seed)
    if len(found) > limit:
        found = [found[i] for i in sorted(rng.choice(len(found), limit, replace=False))]
    items = [Item(None, t) for t in found]
    return {"text": (new.encode(items, role="query"), old.encode(items, role="query"))}


def other_segments_items(store: IndexStore, seg: Segment, modality: str, limit: int, seed: int = 0) -> list[Item]:
    """Up to `limit` live documents of `modality` from the segments other than `seg`."""
    rng = np.random.default_rng(seed)
    found = []
    for other in store.segments:
        if other.id == seg.id:
            continue
        rows = np.flatnonzero((other.codes == MODALITY_CODES[modality]) & other.alive)
        found.extend((other.id, int(r)) for r in rows)
    if len(found) > limit:
        found = [found[i] for i in sorted(rng.choice(len(found), limit, replace=False))]
    items, epochs = [], {other.id: other.epoch for other in store.segments}
    for seg_id in sorted({s for s, _ in found}):
        docs = store.docs.docs_at(seg_id, [r for s, r in found if s == seg_id], epochs[seg_id])
        items.extend(stored_item(store.path, d) for d in docs.values())
    return items


def segment_encoder(seg: Segment) -> Encoder:
    """The encoder a segment was embedded with, refusing one whose weights have changed since."""
    enc = load_recorded(seg.record["encoder"])
    if enc.fingerprint != seg.record["encoder"]["fingerprint"]:
        raise InvalidArgument(f"segment {seg.id}'s encoder {seg.record['encoder']['spec']} no longer loads "
                         "with the same weights; calibrate from the corpus instead")
    return enc


def read_calibration_items(path: str, limit: int) -> list[Item]:
    """Queries from a JSONL file ({"text", "image"} per line, image paths relative to it)."""
    base = Path(path).parent
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        text = rec.get("text") or rec.get("query_txt")
        img = rec.get("image") or rec.get("query_img_path")
        items.append(Item(None, text, str(base / img) if img else None))
        if len(items) >= limit:
            break
    return items


def item_pairs(items: list[Item], old: Encoder, new: Encoder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same query items through both encoders, by query modality."""
    by_mod: dict[str, list] = defaultdict(list)
    for it in items:
        by_mod[it.modality].append(it)
    return {m: (new.encode(its, role="query"), old.encode(its, role="query")) for m, its in by_mod.items()}


def generic_pairs(store: IndexStore, seg: Segment, old: Encoder, new: Encoder, limit: int,
                  seed: int = 0) -> tuple[dict, list[str]]:
    """Text calibration for a segment that holds no texts of its own (a photo library): umr's
    generic queries (retrieval/update/generic_queries.py), keeping those that lie nearest the
    segment's documents in its own space, so the map is fitted where the segment's queries
    will be. Returns the pairs and the texts kept."""
    pool = list(generic_queries(GENERIC_POOL))
    pool_old = old.encode_texts(pool)
    alive = np.flatnonzero(seg.alive)
    rows = alive if len(alive) <= GENERIC_ANCHORS else np.sort(
        np.random.default_rng(seed).choice(alive, GENERIC_ANCHORS, replace=False))
    docs = store.docs.vectors_at(seg.id, rows)
    near = np.argsort(-(docs @ pool_old.T), axis=1)[:, :GENERIC_PER_DOCUMENT]
    picked, counts = np.unique(near, return_counts=True)
    picked = picked[np.argsort(-counts, kind="stable")][:limit]  # the most often picked first
    texts = [pool[i] for i in picked]
    return {"text": (new.encode_texts(texts), pool_old[picked])}, texts


def combined_pairs(images: list[Item], texts: list[str], old: Encoder, new: Encoder, limit: int,
                   seed: int = 0) -> dict:
    """image+text calibration where no source has such queries: calibration images each paired
    with a calibration text, embedded by both encoders as one query."""
    rng = np.random.default_rng(seed)
    n = min(limit, len(images))
    pick = rng.choice(len(images), n, replace=False)
    items = [Item(None, texts[int(rng.integers(len(texts)))], images[i].image) for i in pick]
    return {"image,text": (new.encode(items, role="query"), old.encode(items, role="query"))}



@dataclass
class SegmentPairs:
    """What the calibration sources gave for one segment."""

    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=lambda: defaultdict(list))
    sources: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    images: list[Item] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, source: str, got: dict) -> None:
        for modality, (new_vecs, old_vecs) in got.items():
            if len(new_vecs):
                self.pairs[modality].append((new_vecs, old_vecs))
                self.sources[modality].append(source)

    def count(self, modality: str) -> int:
        return sum(len(n) for n, _ in self.pairs.get(modality, []))

    def stacked(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([n for n, _ in self.pairs[modality]]), np.concatenate([o for _, o in self.pairs[modality]]))


def check_sources(calibration: list[str]) -> None:
    for src in calibration:
        if src not in ("corpus", "passages", "generic") and not Path(src).is_file():
            raise InvalidArgument(f"--calibration {src}: not a file, and not one of corpus, passages, generic")


def segment_pairs(store: IndexStore, seg: Segment, new: Encoder, calibration: list[str], default: bool,
                  per_modality: int, seed: int = 0) -> SegmentPairs:
    got = SegmentPairs()
    old_state: dict = {}

    def old_encoder(why: str) -> Encoder | None:
        """The segment's own encoder; where it no longer loads, the default sources that need it
        are skipped with a note, and a source the user named is an error."""
        if "encoder" not in old_state:
            try:
                old_state["encoder"], old_state["error"] = segment_encoder(seg), None
            except Exception as e:  # noqa: BLE001 - any failure to load means the same here
                old_state["encoder"], old_state["error"] = None, str(e)
        if old_state["encoder"] is None:
            if not default:
                raise InvalidArgument(old_state["error"])
            got.notes.append(f"{why} skipped: {old_state['error']}")
        return old_state["encoder"]

    def generic(why: str) -> None:
        old = old_encoder(why)
        if old is not None and new.supports_texts:
            pairs, texts = generic_pairs(store, seg, old, new, per_modality, seed)
            got.add("generic", pairs)
            got.texts.extend(texts)

    for src in calibration:
        if src == "corpus":
            pairs, items = corpus_pairs(store, seg, new, per_modality, seed)
            got.add("corpus", pairs)
            got.images.extend(items.get("image", []))
            got.texts.extend(it.text for it in items.get("text", []))
        elif src == "generic":
            generic("generic queries")
        else:
            old = old_encoder("passages" if src == "passages" else src)
            if old is None:
                continue
            if src == "passages":
                got.add("passages", passage_pairs(store, seg, old, new, per_modality, seed))
            else:
                items = read_calibration_items(src, per_modality)
                got.add(src, item_pairs(items, old, new))
                got.images.extend(it for it in items if it.image is not None and not it.text)
                got.texts.extend(it.text for it in items if it.text and it.image is None)
    embeds = {"text": new.supports_texts, "image": new.supports_images,
              "image,text": new.supports_texts and new.supports_images}
    for modality in QUERY_MODALITIES:
        if got.count(modality) >= MIN_PAIRS or not embeds[modality]:
            continue
        # A small segment (the few documents a version embedded before another was activated
        # again): the same kind of items from the other segments, through both encoders.
        items = other_segments_items(store, seg, modality, per_modality, seed)
        old = old_encoder("documents of other segments") if len(items) >= MIN_PAIRS else None
        if old is not None:
            got.add("documents of other segments", item_pairs(items, old, new))
            got.images.extend(it for it in items if it.image is not None and not it.text)
    if default and got.count("text") < MIN_PAIRS:
        # A photo library: its users search it by text, and it holds no texts to pair.
        generic("generic queries")
    if got.count("image,text") < MIN_PAIRS and got.images and got.texts and new.supports_images and new.supports_texts:
        old = old_encoder("image+text pairs")
        if old is not None:
            texts = "generic queries" if got.sources.get("text") == ["generic"] else "calibration texts"
            got.add(f"images paired with {texts}", combined_pairs(got.images, got.texts, old, new, COMBINED_PAIRS, seed))
    return got
