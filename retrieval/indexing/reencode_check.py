"""`umr index verify --reencode N [--repair]`: stored vectors against fresh encodings of their
documents.

A stored vector that is not the encoding of its document is found by nothing else: FAISS agrees
with the store (it was filled from it), and a search still answers, only wrongly (a document
ranked 6th for its own text). This embeds a random sample of the stored documents again with
the encoder of their segment's version, where that encoder loads here with the fingerprint the
index recorded, and reports each one further than MIN_COSINE from what is stored; with repair,
the fresh vector replaces the stored one and the segment's FAISS index is rebuilt from the store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore
from umr.retrieval.encoders import load_recorded
from umr.retrieval.items import stored_item

# Encoding the same document twice gives the same vector to float rounding (1e-6); the image
# path's JPEG draft decoding is deterministic too. Half a per-mille leaves room for another
# machine's kernels, while the vectors the concurrency bug stored were at cosine 0.54-0.98.
MIN_COSINE = 0.999


@dataclass
class ReencodeReport:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def add_to(self, report) -> None:
        """Into an index.verify.VerifyReport: what was found, mended, or cannot be."""
        report.checked += self.checked
        report.problems += self.problems
        report.repaired += self.repaired
        if any("cannot be encoded again" in p for p in self.problems):
            report.unrepairable.append("documents that cannot be encoded again (their image files are gone or "
                                       "unreadable): put the files back, or delete those documents")
        if not self.repaired and any("fresh encoding" in p for p in self.problems):
            report.unrepairable.append("stored vectors that are not their documents' encodings: `umr index verify "
                                       "--reencode N --repair` replaces them with fresh ones")


def reencode_check(index_dir: str | Path, n: int, seed: int = 0, batch_size: int = 64,
                   repair: bool = False) -> ReencodeReport:
    report = ReencodeReport()
    store = IndexStore.open(index_dir, "write" if repair else "read", check=False)
    try:
        live = [(seg, row) for seg in store.segments for row in np.flatnonzero(seg.alive)]
        if not live:
            report.checked.append("re-encoding: the index holds no documents")
            return report
        rng = np.random.default_rng(seed)
        picked = sorted(rng.choice(len(live), min(n, len(live)), replace=False))
        by_segment: dict[int, list[int]] = {}
        for i in picked:
            seg, row = live[i]
            by_segment.setdefault(seg.id, []).append(int(row))
        compared = 0
        for seg in store.segments:
            rows = by_segment.get(seg.id)
            if not rows:
                continue
            version = seg.record["encoder"].get("version", 1)
            record = store.version(version)
            encoder = load_recorded(record)
            if encoder.fingerprint != record["fingerprint"]:
                report.checked.append(f"segment {seg.id}: not re-encoded; its encoder {record['spec']} (version "
                                      f"{version}) does not load here with the weights it was built with")
                continue
            docs = store.docs.docs_at(seg.id, rows, seg.epoch)
            stored = store.docs.vectors_at(seg.id, np.array(rows))
            wrong_rows, wrong_vectors = [], []
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                fresh = _encode(encoder, [stored_item(store.path, docs[r]) for r in part], report, docs, part)
                for j, r in enumerate(part):
                    if fresh[j] is None:
                        continue
                    cos = float(np.dot(fresh[j], stored[start + j]))
                    compared += 1
                    if cos < MIN_COSINE:
                        what = (f"document {docs[r].id!r} (segment {seg.id}, row {r}): its stored vector is at cosine "
                                f"{cos:.4f} to a fresh encoding of it")
                        (report.repaired if repair else report.problems).append(
                            f"{what}; replaced by the fresh one" if repair else what)
                        wrong_rows.append(r)
                        wrong_vectors.append(fresh[j])
            if repair and wrong_rows:
                store.docs.put_vectors(seg.id, np.array(wrong_rows), np.stack(wrong_vectors))
                store.rebuild(seg, f"segment {seg.id}: {len(wrong_rows)} stored vectors replaced by fresh encodings")
        if repair and store.repairs:
            store.save()
        report.checked.append(f"stored vectors against fresh encodings: {compared} documents of a sample of "
                              f"{len(picked)} (cosine at least {MIN_COSINE})")
    finally:
        store.close()
    return report


def _encode(encoder, items, report: ReencodeReport, docs, rows) -> list:
    """Each item's fresh vector, or None (with a problem reported) when it cannot be encoded
    any more (its image file is gone or unreadable)."""
    try:
        return list(encoder.encode(items, role="document"))
    except InvalidArgument:
        out = []
        for item, r in zip(items, rows):
            try:
                out.append(encoder.encode([item], role="document")[0])
            except InvalidArgument as e:
                report.problems.append(f"document {docs[r].id!r}: cannot be encoded again ({e})")
                out.append(None)
        return out
