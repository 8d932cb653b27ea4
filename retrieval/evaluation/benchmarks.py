"""Evaluation on M-BEIR (multimodal, per task, local or global pool) and BEIR (text) data."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from umr.index.errors import InvalidArgument
from umr.retrieval.encoders.base import Encoder
from umr.retrieval.items import Item
from umr.retrieval.corpus.mbeir import target_modality
from umr.retrieval.evaluation.metrics import curve, summarize
from umr.retrieval.corpus.readers import MbeirPoolCorpus, Rejected, mbeir_image_root

KS = (1, 5, 10)
CURVE_DEPTH = 100  # k = 1..100 for the curves `umr eval --plot` draws


def _with_curves(res: dict, runs, qrels, depth: int | None) -> dict:
    if depth:
        ks = list(range(1, depth + 1))
        res["curve"] = {"k": ks, "hit_rate": curve(runs, qrels, "hit_rate", ks), "recall": curve(runs, qrels, "recall", ks)}
    return res


def _encode_all(encoder: Encoder, items: list[Item], role: str, instruction=None, batch_size: int = 64) -> np.ndarray:
    try:
        return encoder.encode(items, role, instruction, batch_size)
    except (ValueError, OSError) as e:
        raise InvalidArgument(f"cannot encode the evaluation data: {e}") from None


def _rank(q: np.ndarray, c: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    from umr.index.vector_index import exact_topk

    _, top = exact_topk(np.ascontiguousarray(q, np.float32), c, k)
    return [[ids[j] for j in row if j >= 0] for row in top]


def _rank_calibrated(q: np.ndarray, qmods: list[str], c: np.ndarray, cmods: np.ndarray, ids: list[str], k: int,
                     cal) -> list[list[str]]:
    """Per candidate modality the top k, on the calibrated scale, merged (as `IndexStore.search`)."""
    from umr.index.vector_index import exact_topk

    merged: list[list[tuple[float, str]]] = [[] for _ in range(len(q))]
    qmods = np.asarray(qmods)
    for qm in sorted(set(qmods.tolist())):
        rows = np.flatnonzero(qmods == qm)
        for dm in sorted(set(cmods.tolist())):
            cols = np.flatnonzero(cmods == dm)
            raw, top = exact_topk(np.ascontiguousarray(q[rows], np.float32), c[cols], k)
            scores = cal.apply(raw, qm, dm)
            for j, r in enumerate(rows):
                merged[r].extend((float(s), ids[cols[t]]) for s, t in zip(scores[j], top[j]) if t >= 0)
    return [[d for _, d in sorted(m, key=lambda x: -x[0])[:k]] for m in merged]


def find_mbeir_files(root: Path, split: str) -> tuple[list[Path], dict[int, Path], dict[int, Path]]:
    pools = sorted((root / "cand_pool").glob(f"*_{split}_cand_pool.jsonl"))
    queries, qrels = {}, {}
    for p in sorted((root / "query").glob(f"*_task*_{split}.jsonl")):
        task = int(p.stem.split("_task")[1].split("_")[0])
        queries[task] = p
    for p in sorted((root / "qrels").glob(f"*_task*_{split}_qrels.txt")):
        task = int(p.stem.split("_task")[1].split("_")[0])
        qrels[task] = p
    if not pools or not queries:
        raise FileNotFoundError(f"{root} has no M-BEIR {split} files (cand_pool/*_{split}_cand_pool.jsonl, query/*_taskN_{split}.jsonl)")
    return pools, queries, qrels


def read_mbeir_qrels(path: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out[parts[0]][parts[2]] = float(parts[3])
    return out


def evaluate_mbeir(encoder: Encoder, root: str | Path, split: str = "test", tasks: list[int] | None = None,
                   local: bool = True, instruction: str | None = None, calibrated: bool = True,
                   curves: bool = False) -> dict:
    """Hit rate@1/5/10 (what M-BEIR calls Recall@k), recall@1/5/10, nDCG@10 and MRR@10 per task
    (retrieval/evaluation/metrics.py says how each is defined).

    With `curves`, each task also gets hit rate and recall at k = 1..100 (`curve`).
    Local: candidates restricted to the task's target modality (the modality of its positives).
    Global: the whole mixed pool of every task of the split, ranked as an index ranks it: by
    scores calibrated across modalities (fitted on the pool itself), or with `calibrated=False`
    by raw cosine.
    """
    root = Path(root)
    pools, query_files, qrels_files = find_mbeir_files(root, split)
    image_root = mbeir_image_root(pools[0])
    cands = [r for p in pools for r in MbeirPoolCorpus(p, image_root) if not isinstance(r, Rejected)]
    cvec = _encode_all(encoder, cands, "document")
    cids = [c.id for c in cands]
    cmod = np.array([c.modality for c in cands])
    modality_of = dict(zip(cids, cmod))
    cal = None
    if not local and calibrated and len(set(cmod.tolist())) > 1:
        from umr.index.modality_calibration import fit_dense

        cal = fit_dense(cvec, cmod)
    results = {}
    depth = max(KS + ((CURVE_DEPTH,) if curves else ()))
    for task in sorted(query_files):
        if tasks and task not in tasks:
            continue
        qs = [json.loads(line) for line in query_files[task].read_text().splitlines() if line.strip()]
        if task in qrels_files:
            qrels = read_mbeir_qrels(qrels_files[task])
        else:
            qrels = {q["qid"]: {d: 1.0 for d in q["pos_cand_list"]} for q in qs}
        items = [Item(q["qid"], q.get("query_txt"), str(image_root / q["query_img_path"]) if q.get("query_img_path") else None)
                 for q in qs]
        qvec = _encode_all(encoder, items, "query", instruction)
        if local:
            target = target_modality((d for q in qrels.values() for d in q), modality_of)
            mask = cmod == target
            pool_desc = f"local ({target})"
        else:
            mask = np.ones(len(cids), dtype=bool)
            pool_desc = "global"
        ids = [c for c, m in zip(cids, mask) if m]
        qmods = [it.modality for it in items]
        if cal is not None and all(cal.covers(m, sorted(set(cmod.tolist()))) for m in set(qmods)):
            pool_desc = "global (calibrated across modalities)"
            ranked = _rank_calibrated(qvec, qmods, cvec, cmod, cids, depth, cal)
        else:
            ranked = _rank(qvec, cvec[mask], ids, depth)
        runs = dict(zip([q["qid"] for q in qs], ranked))
        res = _with_curves(summarize(runs, qrels, KS), runs, qrels, CURVE_DEPTH if curves else None)
        res.update({"pool": pool_desc, "candidates": int(mask.sum()), "query_file": query_files[task].name})
        results[f"task{task}"] = res
    return {"encoder": encoder.spec, "fingerprint": encoder.fingerprint, "split": split, "tasks": results}


def evaluate_beir(encoder: Encoder, root: str | Path, split: str = "test", instruction: str | None = None,
                  curves: bool = False) -> dict:
    root = Path(root)
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines() if line.strip()]
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()}
    qrels: dict[str, dict[str, float]] = defaultdict(dict)
    with open(root / "qrels" / f"{split}.tsv", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for qid, did, score in reader:
            qrels[qid][did] = float(score)
    docs = [Item(d["_id"], " ".join(x for x in (d.get("title"), d.get("text")) if x)) for d in corpus]
    empty = [d.id for d in docs if not d.text.strip()]
    docs = [d for d in docs if d.text.strip()]  # an empty document can never be relevant to a dense ranker
    dvec = _encode_all(encoder, docs, "document")
    qids = [q for q in queries if q in qrels]
    qvec = _encode_all(encoder, [Item(q, queries[q]) for q in qids], "query", instruction)
    runs = dict(zip(qids, _rank(qvec, dvec, [d.id for d in docs], max(100, CURVE_DEPTH))))
    res = _with_curves(summarize(runs, qrels, (1, 5, 10, 100)), runs, qrels, CURVE_DEPTH if curves else None)
    res.update({"candidates": len(docs), "empty_documents_skipped": len(empty)})
    return {"encoder": encoder.spec, "fingerprint": encoder.fingerprint, "split": split, "tasks": {"beir": res}}


def format_table(result: dict) -> str:
    lines = [f"encoder {result['encoder']} ({result['fingerprint']}), split {result['split']}"]
    cols = ["hit_rate@1", "hit_rate@5", "hit_rate@10", "recall@10", "ndcg@10", "mrr@10"]
    lines.append(f"{'task':<8}{'queries':>8}  {'pool':<18}" + "".join(f"{c:>12}" for c in cols))
    for task, r in result["tasks"].items():
        lines.append(f"{task:<8}{r['queries']:>8}  {r.get('pool', str(r.get('candidates'))):<18}"
                     + "".join(f"{r.get(c, float('nan')):>12.4f}" for c in cols))
    return "\n".join(lines)
