"""Merged search after an encoder upgrade, at every size of the new segment (issue 24).

v1 = lit-base@1 (256-d). The index: the 200 flickr8k-1k test photos, embedded by v1. Then
`umr update` (no calibration flags) to v2, and 10, 27, 100, 372 and 3,781 clothing-small photos
added through v2 (a fixed shuffled order of all 3,781; each size on a fresh copy of the updated
index). Two v2s: lit-base (384-d, another text tower), and lit-base@1 trained 10 epochs on
clothing-small/train with distillation to v1 (`umr train --teacher lit-base@1 --distill-weight 1`;
256-d, the new encoder that over-scores its own domain).

Old queries: the 1,000 test captions, hit rate@5 of their photo, as a share of the v1 index
alone. New queries: 80 class queries (8 templates x 10 classes), precision@10 of clothing
photos of the class, as a share of a full re-index (every photo embedded by v2, exact search).
Never upgraded: the same photos all embedded by v1 (exact search), what adding them costs old
queries in one space, with no merge at all. Merged (umr's default: older segments' scores on the active encoder's scale,
index/version_scale.py) and raw cosines (`calibrated=False`), side by side. Then a mixed
index (photos with captions beside photos alone): does a calibrated ranking put a document
whose cosine is more than 0.1 below the relevant one's above it? Quality figures are
deterministic (seeded); run: python bench/merge.py [--trained DIR: a v2 trained beforehand
with the recipe above, to skip training it]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, machine, write_section  # noqa: E402

FLICKR = DATA / "flickr8k-1k"
CLOTHING = DATA / "clothing-small"
TEMPLATES = ["a photo of a {}", "a {}", "{}", "an image of a {}", "a picture of a {}", "a product photo of a {}",
             "someone wearing a {}", "a {} on a white background"]
SIZES = (10, 27, 100, 372, 3781)


def log(*m):
    print(*m, file=sys.stderr, flush=True)


def data():
    pool = [json.loads(x) for x in (FLICKR / "mbeir/cand_pool/flickr8k_test_cand_pool.jsonl").read_text().splitlines()]
    photos = [(p["did"], str(FLICKR / p["img_path"])) for p in pool if p["modality"] == "image"]
    queries = [json.loads(x) for x in (FLICKR / "mbeir/query/flickr8k_task0_test.jsonl").read_text().splitlines()]
    old_q = [(q["query_txt"], q["pos_cand_list"][0]) for q in queries]
    files = sorted(CLOTHING.glob("*/*/*.jpg"))
    order = np.random.default_rng(1).permutation(len(files))
    clothing = [(f"clothing/{files[i].parent.name}/{files[i].name}", str(files[i])) for i in order]
    classes = sorted(p.name for p in (CLOTHING / "test").iterdir() if p.is_dir())
    new_q = [(t.format(c), c) for c in classes for t in TEMPLATES]
    return photos, old_q, clothing, new_q


def hit_rate(ids_top: list[list[str]], old_q) -> float:
    return float(np.mean([rel in top[:5] for top, (_, rel) in zip(ids_top, old_q)]))


def precision(ids_top: list[list[str]], new_q) -> float:
    return float(np.mean([np.mean([i.startswith(f"clothing/{c}/") for i in top[:10]]) for top, (_, c) in zip(ids_top, new_q)]))


def exact_top(q: np.ndarray, docs: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    order = np.argsort(-(q @ docs.T), axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


def run_v2(name: str, v2_spec: str, tmp: Path, photos, old_q, clothing, new_q, sizes) -> dict:
    from umr.index import IndexStore
    from umr.index.documents import DocRecord
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine, Query
    from umr.retrieval.items import Item
    from umr.retrieval.update.fit import fit_update
    from umr.retrieval.indexing.vector_import import build_from_vectors

    v1, v2 = load_encoder("lit-base@1"), load_encoder(v2_spec)
    base = tmp / f"{name}-v1"
    np.save(tmp / "v1.npy", v1.encode([Item(i, None, p) for i, p in photos], role="document"))
    (tmp / "v1.jsonl").write_text("".join(json.dumps({"id": i, "image": p, "modality": "image"}) + "\n" for i, p in photos))
    build_from_vectors(tmp / "v1.npy", tmp / "v1.jsonl", v1, base, progress=False)
    e = Engine.open(base)
    old_alone = hit_rate([[h.id for h in hs] for hs in e.search([Query(t) for t, _ in old_q], k=5, modalities=["image"])], old_q)
    e.close()
    updated = tmp / f"{name}-updated"
    shutil.copytree(base, updated)
    store = IndexStore.open(updated)
    t0 = time.perf_counter()
    fit_update(store, v2)
    update_s = time.perf_counter() - t0
    store.close()
    log(f"{name}: update {update_s:.1f} s; embedding {max(sizes)} clothing photos with v2")
    new_vecs = v2.encode([Item(i, None, p) for i, p in clothing[:max(sizes)]], role="document")
    v1_new = v1.encode([Item(i, None, p) for i, p in clothing[:max(sizes)]], role="document")
    v1_photos, q_old_v1 = np.load(tmp / "v1.npy"), v1.encode_texts([t for t, _ in old_q])
    v2_photos = v2.encode([Item(i, None, p) for i, p in photos], role="document")
    q_old, q_new = v2.encode_texts([t for t, _ in old_q]), v2.encode_texts([t for t, _ in new_q])
    rows = []
    for n in sizes:
        idx = tmp / f"{name}-{n}"
        shutil.copytree(updated, idx)
        store = IndexStore.open(idx)
        for start in range(0, n, 1000):
            part = clothing[start:min(n, start + 1000)]
            store.add([DocRecord(i, "image", None, p, {}) for i, p in part], new_vecs[start:start + len(part)])
        store.save()
        store.close()
        e = Engine.open(idx, encoder=v2)
        got = {}
        for label, calibrated in (("merged", True), ("raw", False)):
            old_hits = e.search([Query(t) for t, _ in old_q], k=5, modalities=["image"], calibrated=calibrated)
            new_hits = e.search([Query(t) for t, _ in new_q], k=10, modalities=["image"], calibrated=calibrated)
            got[label] = (hit_rate([[h.id for h in hs] for hs in old_hits], old_q),
                          precision([[h.id for h in hs] for hs in new_hits], new_q))
        e.close()
        shutil.rmtree(idx)
        ids = [i for i, _ in photos] + [i for i, _ in clothing[:n]]
        docs = np.concatenate([v2_photos, new_vecs[:n]])
        reindex = (hit_rate(exact_top(q_old, docs, ids, 5), old_q), precision(exact_top(q_new, docs, ids, 10), new_q))
        never = hit_rate(exact_top(q_old_v1, np.concatenate([v1_photos, v1_new[:n]]), ids, 5), old_q)
        rows.append({"n": n, "merged": got["merged"], "raw": got["raw"], "reindex": reindex, "never": never})
        log(f"{name} n={n}: merged {got['merged']}, raw {got['raw']}, re-index {reindex}, never upgraded {never:.3f}, "
            f"old alone {old_alone:.3f}")
    return {"name": name, "v2": v2_spec, "old_alone": old_alone, "update_s": update_s, "rows": rows}


def table(r: dict) -> str:
    out = [f"**v2 = {r['name']}** (`umr update` {r['update_s']:.0f} s). Old index alone (v1): hit rate@5 {r['old_alone']:.3f}.", "",
           "| new photos | old queries, merged | raw | re-index | never upgraded | merged / never upgraded | "
           "new queries, merged | raw | re-index (=1.00x) |",
           "|---|---|---|---|---|---|---|---|---|"]
    a = r["old_alone"]
    for row in r["rows"]:
        (mo, mn), (ro, rn), (xo, xn) = row["merged"], row["raw"], row["reindex"]
        share = lambda x, ref: f"{x:.3f} ({x / ref:.2f}x)" if ref else f"{x:.3f}"  # noqa: E731
        out.append(f"| {row['n']:,} | **{share(mo, a)}** | {share(ro, a)} | {share(xo, a)} | {share(row['never'], a)} | "
                   f"{mo / row['never']:.2f}x | **{share(mn, xn)}** | {share(rn, xn)} | {xn:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--trained", default=None, help="a v2 trained beforehand (else trained here)")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    photos, old_q, clothing, new_q = data()
    results = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        trained = a.trained
        if trained is None:
            from umr.cli import main as umr

            trained = str(tmp / "trained")
            assert umr(["train", "--pairs", str(CLOTHING / "train"), "--encoder", "lit-base@1", "--teacher", "lit-base@1",
                        "--distill-weight", "1", "--epochs", "10", "--out", trained]) == 0
        for tag, name, spec in (("lit-base", "lit-base", "lit-base"),
                                ("trained", "lit-base@1 trained on clothing-small (distilled)", trained)):
            results.append(run_v2(tag, spec, tmp, photos, old_q, clothing, new_q, sizes))
            results[-1]["name"] = name
        mixed_results = mixed(tmp, clothing)
    body = "\n\n".join([
        "## Merged search after an upgrade, by size of the new segment (`python bench/merge.py`)",
        f"Machine: {machine()}. v1 = lit-base@1 over the 200 flickr8k-1k test photos; `umr update` to v2; then N "
        "clothing-small photos added through v2. Old queries: the 1,000 captions, hit rate@5, as a share of the v1 "
        "index alone; never upgraded: every photo embedded by v1 (what the added photos cost old queries in one space); "
        "merged / never upgraded: old queries merged against the same photos all embedded by v1; new queries: 80 "
        "class queries, precision@10, as a share of a full re-index by v2. Merged: "
        "umr's default (older segments' cosines on the active encoder's scale, fitted on the old segment's own "
        "documents embedded by both encoders: index/version_scale.py); raw: `calibrated=False`.",
        *[table(r) for r in results],
        mixed_table(mixed_results),
    ])
    write_section("merge", body)
    print(body)



def mixed(tmp: Path, clothing) -> dict:
    """Photos with captions (image+text documents) beside photos alone (clothing), one index
    (lit-base): queries of each modality whose relevant document is a Flickr item."""
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine, Query
    from umr.retrieval.indexing.pipeline import build_index

    split = json.loads((FLICKR / "split.json").read_text())["test"]
    caps: dict[str, list[str]] = {}
    for line in (FLICKR / "captions.txt").read_text().splitlines()[1:]:
        name, caption = line.split(",", 1)
        caps.setdefault(name, []).append(caption)
    docs = [{"id": f"flickr/{p}", "text": caps[p][0], "image": str(FLICKR / "images" / p)} for p in split]
    docs += [{"id": i, "image": p} for i, p in clothing[:372]]
    corpus = tmp / "mixed.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    enc = load_encoder("lit-base")
    build_index(corpus, enc, tmp / "mixed", progress=False)
    e = Engine.open(tmp / "mixed", enc)
    kinds = {"image+text (the photo, another caption)": [Query(caps[p][1], str(FLICKR / "images" / p)) for p in split],
             "text (another caption)": [Query(caps[p][2]) for p in split],
             "image (the photo alone)": [Query(None, str(FLICKR / "images" / p)) for p in split]}
    out = {}
    for kind, queries in kinds.items():
        row = {}
        for label, calibrated in (("calibrated", True), ("raw", False)):
            hits = e.search(queries, k=20, calibrated=calibrated)
            ranks, violations, worst = [], 0, 0.0
            for p, hs in zip(split, hits):
                rel = next((i for i, h in enumerate(hs) if h.id == f"flickr/{p}"), None)
                ranks.append(rel if rel is not None else 20)
                if rel is None:
                    continue
                cos = lambda h: h.cosine if h.cosine is not None else h.score  # noqa: E731
                best = cos(hs[rel])
                below = [best - cos(h) for h in hs[:rel] if cos(h) < best - 0.1]
                violations += bool(below)
                worst = max([worst, *below])
            row[label] = {"hit@5": float(np.mean([r < 5 for r in ranks])), "violations": violations, "worst": worst,
                          "queries": len(split)}
        out[kind] = row
        log(f"mixed {kind}: {row}")
    e.close()
    return out


def mixed_table(m: dict) -> str:
    out = ["**Mixed index** (lit-base): the 200 flickr8k-1k test photos each with its first caption (image+text "
           "documents) beside 372 clothing-small photos alone; relevant: the query photo's document. A violation: a "
           "query that ranks a document whose cosine is more than 0.1 below the relevant one's above it.", "",
           "| queries | calibrated: hit@5 | violations | largest gap | raw: hit@5 | violations |", "|---|---|---|---|---|---|"]
    for kind, r in m.items():
        c, w = r["calibrated"], r["raw"]
        out.append(f"| {kind} | {c['hit@5']:.3f} | {c['violations']} of {c['queries']} | {c['worst']:.2f} | "
                   f"{w['hit@5']:.3f} | {w['violations']} of {w['queries']} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
