"""M-BEIR query files and task instructions, for evaluation, mining and training.

Query lines: {"qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list",
"neg_cand_list", "task_id"}. Instructions TSV (UniIR `query_instructions.tsv`): a header, then
query modality, candidate modality, dataset name, dataset id, and the instruction variants.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umr.index.errors import InvalidArgument
from umr.retrieval.items import Item
from umr.retrieval.corpus.readers import MbeirPoolCorpus, Rejected, mbeir_image_root


@dataclass
class MbeirQuery:
    qid: str
    item: Item
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    task_id: int | None = None
    record: dict = field(default_factory=dict)  # the line as read, so outputs keep every field

    @property
    def dataset_id(self) -> str:
        return self.qid.split(":", 1)[0]


def read_queries(path: str | Path, image_root: str | Path | None = None) -> list[MbeirQuery]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"M-BEIR query file not found: {path}")
    root = Path(image_root) if image_root else mbeir_image_root(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            qid = str(rec["qid"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InvalidArgument(f"{path}:{lineno}: not an M-BEIR query line (needs JSON with qid)") from None
        img = rec.get("query_img_path")
        item = Item(qid, rec.get("query_txt"), str(root / img) if img else None)
        try:
            item.modality
        except ValueError:
            raise InvalidArgument(f"{path}:{lineno}: query {qid} has neither query_txt nor query_img_path") from None
        out.append(MbeirQuery(qid, item, [str(d) for d in rec.get("pos_cand_list") or []],
                              [str(d) for d in rec.get("neg_cand_list") or []], rec.get("task_id"), rec))
    if not out:
        raise InvalidArgument(f"no queries in {path}")
    return out


def read_pool(path: str | Path, image_root: str | Path | None = None) -> dict[str, Item]:
    """did -> Item. A malformed candidate is an error here: training on a silently shrunken pool
    would turn its positives into missing ones."""
    pool = {}
    for rec in MbeirPoolCorpus(path, image_root):
        if isinstance(rec, Rejected):
            raise InvalidArgument(f"{path}: candidate {rec.id}: {rec.reason}")
        pool[rec.id] = rec
    if not pool:
        raise InvalidArgument(f"no candidates in {path}")
    return pool


def read_sources(query_paths, pool_paths) -> tuple[list[MbeirQuery], dict[str, Item]]:
    """Queries from several files, one pool from several files (later files win on a did)."""
    queries = [q for path in query_paths for q in read_queries(path)]
    pool = {d: it for path in pool_paths for d, it in read_pool(path).items()}
    return queries, pool


class Instructions:
    """Task instructions per (dataset id, query modality, candidate modality); queries only."""

    def __init__(self, path: str | Path):
        self.variants: dict[tuple[str, str, str], list[str]] = {}
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t")
            next(rows, None)
            for row in rows:
                if len(row) >= 5:
                    key = (row[3].strip(), _modality(row[0]), _modality(row[1]))
                    self.variants[key] = [v.strip() for v in row[4:] if v.strip()]
        if not self.variants:
            raise InvalidArgument(f"{path}: no instructions (expected a TSV: query modality, candidate modality, "
                             "dataset, dataset id, variants...)")

    def pick(self, dataset_id: str, query_modality: str, cand_modality: str, rng: np.random.Generator | None = None) -> str | None:
        found = self.variants.get((dataset_id, query_modality, cand_modality))
        if not found:
            return None
        return found[int(rng.integers(len(found)))] if rng is not None else found[0]


def _modality(value: str) -> str:
    parts = sorted(p.strip() for p in value.replace("|", ",").split(","))
    return ",".join(parts)


def target_modality(positive_ids, modality_of: dict[str, str]) -> str | None:
    """A task's local pool: the modality most of its positives have (M-BEIR local evaluation)."""
    counts = Counter(modality_of[d] for d in positive_ids if d in modality_of)
    return counts.most_common(1)[0][0] if counts else None
