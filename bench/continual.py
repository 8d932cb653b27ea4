"""Continual encoder updates without re-indexing, on real data (image-text setting).

For each v1 (lit-base@1, the 256-d heads the issue was measured with; lit-base, the default):
v2 = v1 trained 10 epochs further on clothing-small/train (class-name captions) with
embedding distillation to v1 (`umr train --teacher v1 --distill-weight 1`).

1. Photo-only index: the 200 flickr8k-1k test photos (no captions) embedded by v1; old
   queries = their 1,000 captions, text -> image. `umr update` with no calibration flags
   (text calibrated from umr's generic queries) against a file of 2,000 real captions, each
   kind of compensator, and v2 re-indexed. Recall@5 (hit rate) and agreement@10 (share of
   v1's top 10 the compensated query retrieves: noise-free where a gap is a few queries).
2. Merged search: after that update, clothing photos added (372 test photos; all train and
   test photos), embedded by v2 in the new segment. Old queries R@5; new queries (80
   class-name queries, 8 templates x 10 classes) precision@10 of clothing photos of the
   class. Merged (umr's default), raw cosines merged, v1 everywhere, v2 re-indexed everywhere,
   against the old index alone and the new photos alone.
3. Same-domain growth: 100 of the photos indexed by v1, the other 100 added after the update.
Run: python bench/continual.py
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATA, figure, machine, median, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402

FLICKR = DATA / "flickr8k-1k"
CLOTHING = DATA / "clothing-small"
TEMPLATES = ["a photo of a {}", "a {}", "{}", "an image of a {}", "a picture of a {}", "a product photo of a {}",
             "someone wearing a {}", "a {} on a white background"]
KINDS = ("mean", "kernel", "linear", "orthogonal", "mlp")


def log(*m):
    print(*m, file=sys.stderr, flush=True)


def write_corpus(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class Setup:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        pool = [json.loads(x) for x in (FLICKR / "mbeir/cand_pool/flickr8k_test_cand_pool.jsonl").read_text().splitlines()]
        self.photos = [{"id": p["did"], "image": str(FLICKR / p["img_path"])} for p in pool if p["modality"] == "image"]
        queries = [json.loads(x) for x in (FLICKR / "mbeir/query/flickr8k_task0_test.jsonl").read_text().splitlines()]
        self.old_q = [(q["query_txt"], q["pos_cand_list"][0]) for q in queries]
        self.old_q_file = FLICKR / "mbeir/query/flickr8k_task0_test.jsonl"
        test = {q for q, _ in self.old_q}
        captions = [x.split(",", 1)[1] for x in (FLICKR / "flickr8k_all_captions.txt").read_text().splitlines()[1:]]
        self.captions_file = write_corpus(tmp / "captions2000.jsonl",
                                          [{"text": t} for t in [t for t in captions if t not in test][::7][:2000]])
        self.clothing = {}
        for name, pattern in (("372 test photos", "test/*/*.jpg"), ("all photos", "*/*/*.jpg")):
            files = sorted(CLOTHING.glob(pattern))
            self.clothing[name] = write_corpus(tmp / f"clothing-{len(files)}.jsonl",
                                               [{"id": f"clothing/{p.parent.name}/{p.name}", "image": str(p)} for p in files])
        classes = sorted(p.name for p in (CLOTHING / "test").iterdir() if p.is_dir())
        self.new_q = [(t.format(c), c) for c in classes for t in TEMPLATES]


def old_scores(engine, setup: Setup, ideal: list[list[str]] | None = None) -> tuple[float, float]:
    """(R@5 of the old queries, agreement@10 with `ideal`: v1's top 10 against the old index)."""
    from umr.retrieval.engine import Query

    hits = engine.search([Query(t) for t, _ in setup.old_q], k=10, modalities=["image"])
    r5 = float(np.mean([any(h.id == rel for h in hs[:5]) for hs, (_, rel) in zip(hits, setup.old_q)]))
    if ideal is None:
        return r5, float("nan")
    agree = float(np.mean([len({h.id for h in hs} & set(want)) / len(want) for hs, want in zip(hits, ideal)]))
    return r5, agree


def top10(engine, setup: Setup) -> list[list[str]]:
    from umr.retrieval.engine import Query

    return [[h.id for h in hs] for hs in engine.search([Query(t) for t, _ in setup.old_q], k=10, modalities=["image"])]


def new_precision(engine, setup: Setup) -> float:
    from umr.retrieval.engine import Query

    hits = engine.search([Query(t) for t, _ in setup.new_q], k=10, modalities=["image"])
    return float(np.mean([np.mean([h.id.startswith(f"clothing/{c}/") for h in hs]) for hs, (_, c) in zip(hits, setup.new_q)]))


def build(corpus: Path, encoder, out: Path, more: Path | None = None, more_encoder=None) -> Path:
    from umr.index import IndexStore
    from umr.retrieval.indexing.pipeline import add_to_index, build_index

    shutil.rmtree(out, ignore_errors=True)
    build_index(corpus, encoder, out, progress=False)
    if more is not None:
        store = IndexStore.open(out)
        add_to_index(store, more_encoder or encoder, more, progress=False)
        store.close()
    return out


def updated(base: Path, out: Path, v2, **kw) -> tuple[Path, dict, float]:
    from umr.index import IndexStore
    from umr.retrieval.update.fit import fit_update

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    store = IndexStore.open(out)
    t0 = time.perf_counter()
    report = fit_update(store, v2, **kw)
    seconds = time.perf_counter() - t0
    store.close()
    return out, report, seconds


def run_v1(v1_spec: str, setup: Setup, distill: bool = True, merged_too: bool = True) -> dict:
    from umr.index import IndexStore
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine
    from umr.retrieval.indexing.pipeline import add_to_index
    from umr.cli import main as umr

    tmp = setup.tmp / (v1_spec.replace("@", "-") + ("" if distill else "-nodistill"))
    tmp.mkdir()
    v1 = load_encoder(v1_spec)
    v2_dir = tmp / "v2"
    recipe = ["--teacher", v1_spec, "--distill-weight", "1", "--epochs", "10"] if distill else ["--epochs", "20"]
    assert umr(["train", "--pairs", str(CLOTHING / "train"), "--encoder", v1_spec, *recipe, "--out", str(v2_dir)]) == 0
    v2 = load_encoder(str(v2_dir))
    out: dict = {"v1": v1_spec, "dims": (v1.dim, v2.dim), "v2": " ".join(recipe)}

    # -- 1. photo-only index ---------------------------------------------------------------
    photos = write_corpus(tmp / "photos.jsonl", setup.photos)
    base = build(photos, v1, tmp / "photos-v1")
    e = Engine.open(base)
    ideal = top10(e, setup)
    out["v1 alone"] = old_scores(e, setup, ideal)
    if v1.dim == v2.dim:
        e.encoder = v2  # v2's queries straight against v1's vectors
        out["v2 uncompensated"] = old_scores(e, setup, ideal)
    e.close()
    variants = {}
    secs = []
    for rep in range(3):
        idx, report, s = updated(base, tmp / "photos-default", v2, eval_path=str(setup.old_q_file))
        secs.append(s)
    out["update seconds (median of 3)"] = median(secs)
    out["default report"] = report
    e = Engine.open(idx)
    variants["umr update, no calibration flags (generic queries), chosen"] = old_scores(e, setup, ideal)
    e.close()
    out["kinds (default)"] = report["eval"]["hit_rate@5"]
    idx2, report2, _ = updated(base, tmp / "photos-captions", v2, calibration=["corpus", str(setup.captions_file)],
                              eval_path=str(setup.old_q_file))
    e = Engine.open(idx2)
    variants["--calibration corpus + 2,000 real captions, chosen"] = old_scores(e, setup, ideal)
    e.close()
    out["kinds (captions)"] = report2["eval"]["hit_rate@5"]
    e = Engine.open(build(photos, v2, tmp / "photos-v2"))
    variants["v2 re-indexed"] = old_scores(e, setup, ideal)
    e.close()
    out["variants"] = variants
    out["chosen"] = {m: r.get("chosen") for m, r in report["segments"][0]["modalities"].items()}
    if not merged_too:
        return out

    # -- 2. merged search --------------------------------------------------------------------
    merged = {}
    for name, corpus in setup.clothing.items():
        log(v1_spec, "merged", name)
        rows = {}
        e = Engine.open(build(corpus, v2, tmp / "new-alone"))
        rows["new photos alone (v2)"] = (float("nan"), new_precision(e, setup))
        e.close()
        idx, _, _ = updated(base, tmp / "merged", v2)
        store = IndexStore.open(idx)
        add_to_index(store, v2, corpus, progress=False)
        store.close()
        e = Engine.open(idx)
        rows["merged (umr default)"] = (old_scores(e, setup)[0], new_precision(e, setup))
        e.calibrated = False
        rows["merged, raw cosines"] = (old_scores(e, setup)[0], new_precision(e, setup))
        e.close()
        for label, enc in (("v1 everywhere", v1), ("v2 re-indexed everywhere", v2)):
            e = Engine.open(build(photos, enc, tmp / "single", corpus))
            rows[label] = (old_scores(e, setup)[0], new_precision(e, setup))
            e.close()
        merged[name] = rows
    out["merged"] = merged

    # -- 3. same-domain growth ----------------------------------------------------------------
    half_a = write_corpus(tmp / "half-a.jsonl", setup.photos[0::2])
    half_b = write_corpus(tmp / "half-b.jsonl", setup.photos[1::2])
    idx, _, _ = updated(build(half_a, v1, tmp / "half-v1"), tmp / "half-merged", v2)
    store = IndexStore.open(idx)
    add_to_index(store, v2, half_b, progress=False)
    store.close()
    same = {}
    e = Engine.open(idx)
    same["merged (umr default)"] = old_scores(e, setup)[0]
    e.calibrated = False
    same["merged, raw cosines"] = old_scores(e, setup)[0]
    e.close()
    for label, enc in (("v1 everywhere", v1), ("v2 re-indexed everywhere", v2)):
        e = Engine.open(build(photos, enc, tmp / "same-single"))
        same[label] = old_scores(e, setup)[0]
        e.close()
    out["same domain"] = same
    return out


def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def section(r: dict, n: int) -> str:
    v1_r5, _ = r["v1 alone"]
    lines = [f"### v1 = `{r['v1']}` ({r['dims'][0]}-d), v2 = `umr train --pairs clothing-small/train --encoder "
             f"{r['v1']} {r['v2']}` ({r['dims'][1]}-d)", "",
             "**1. Photo-only index** (200 flickr8k-1k test photos), old queries = their 1,000 captions:", "",
             "| | hit rate@5 | agreement@10 with v1 |", "|---|---|---|",
             f"| v1 (the index as built) | {v1_r5:.3f} | 1.000 |"]
    unc = r.get("v2 uncompensated")
    if unc:
        lines.append(f"| v2 uncompensated | {unc[0]:.3f} | {unc[1]:.3f} |")
    for label, (r5, agree) in r["variants"].items():
        lines.append(f"| {label} | {r5:.3f} | {fmt(agree)} |")
    lines.append("")
    lines.append("Every compensator kind, hit rate@5 (`--eval`): default calibration " + ", ".join(
        f"{k} {v:.3f}" for k, v in r["kinds (default)"].items()) + "; with the captions file " + ", ".join(
        f"{k} {v:.3f}" for k, v in r["kinds (captions)"].items()) + ".")
    if unc:
        chosen = r["variants"]["umr update, no calibration flags (generic queries), chosen"]
        ref = r["variants"]["--calibration corpus + 2,000 real captions, chosen"]
        gap_r5, gap_ag = v1_r5 - unc[0], 1 - unc[1]
        rec = lambda got, base, gap: f"{(got - base) / gap:.0%}" if gap > 0 else "no gap"  # noqa: E731
        lines.append(f"Gap recovered by the default: hit rate@5 {rec(chosen[0], unc[0], gap_r5)} "
                     f"(of {gap_r5:+.3f}, {round(gap_r5 * 1000)} queries), agreement@10 "
                     f"{rec(chosen[1], unc[1], gap_ag)}; with the real captions: hit rate@5 {rec(ref[0], unc[0], gap_r5)}, "
                     f"agreement@10 {rec(ref[1], unc[1], gap_ag)}.")
    cmp = r["default report"]["eval"]["chosen against old"]
    lo, hi = cmp["interval95"]
    lines.append(f"Chosen: {', '.join(f'{m} {c}' for m, c in r['chosen'].items())}; the `--eval` guard measured "
                 f"{cmp['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] against v1 (activated). "
                 f"`umr update` took {r['update seconds (median of 3)']:.1f} s (median of 3, with `--eval`).")
    photo_only = {"v1 (the index as built)": (v1_r5, 1.0), **({"v2 uncompensated": unc} if unc else {}), **r["variants"]}
    lines += ["", figure(f"continual-{n}", bars, {
        "photo-only index, hit rate@5": {k: v[0] for k, v in photo_only.items()},
        "agreement@10 with v1": {k: v[1] for k, v in photo_only.items() if v[1] == v[1]},
        "every compensator, default calibration (hit rate@5)": dict(r["kinds (default)"])},
        ylabel="score", ylim=(0, 1.05), title=f"v1 = {r['v1']}, v2 {r['v2']}")]
    if "merged" not in r:
        return "\n".join(lines)
    lines += ["", "**2. Merged search**: the update above, then clothing photos added (embedded by v2 in the new "
              "segment). Old queries hit rate@5; new queries (80 class-name queries) precision@10:", ""]
    for name, rows in r["merged"].items():
        new_alone = rows["new photos alone (v2)"][1]
        lines += [f"*{name}:*", "", "| | old queries | x old alone | new queries | x new alone |", "|---|---|---|---|---|",
                  f"| old index alone (v1) | {v1_r5:.3f} | 1.00 | | |",
                  f"| new photos alone (v2) | | | {new_alone:.3f} | 1.00 |"]
        for label, (o, n) in rows.items():
            if label != "new photos alone (v2)":
                lines.append(f"| {label} | {o:.3f} | {o / v1_r5:.2f} | {n:.3f} | {n / new_alone:.2f} |")
        lines.append("")
    s = r["same domain"]
    lines.append("**3. Same-domain growth** (100 photos by v1, the other 100 added after the update), old queries hit rate@5: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in s.items()) + ".")
    return "\n".join(lines)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="umr-continual-"))
    t0 = time.perf_counter()
    setup = Setup(tmp)
    results = [run_v1("lit-base@1", setup), run_v1("lit-base@1", setup, distill=False, merged_too=False),
               run_v1("lit-base", setup)]
    body = f"""## Continual updates without re-indexing (`bench/continual.py`)

Image-text setting, {machine()}; whole run {time.perf_counter() - t0:.0f} s. Hit rate@5 (M-BEIR's Recall@5): a relevant
photo in the top 5. The merged tables are what issue 10 asks of merged search: old queries >= 0.95 x the old index
alone and new queries >= 0.95 x the new photos alone, both at once. Quality figures are deterministic (seeded);
only the times vary between runs.

""" + "\n\n".join(section(r, i + 1) for i, r in enumerate(results))
    write_section("continual", body)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
