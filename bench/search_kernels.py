"""The two kernels behind a search: exact top-k over the vectors, and the text tower's forward.

  exact top-k   umr's exact_topk (torch GEMM + top-k) against numpy GEMM + argpartition (what
                it replaced) and FAISS IndexFlatIP.search, over 100,000 x 384 unit vectors
  text forward  lit-base's MiniLM with texts packed into shared rows (retrieval/encoders/
                packing.py) against the padded batch, on real Flickr8k captions
The ways of each kernel take turns within every repeat, in this process, with `umr serve`'s
thread settings; medians of REPEATS timings. The top-k answers and the vectors are checked
equal before timing.
Run: python bench/search_kernels.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from umr.cli import SERVE_ENV  # noqa: E402

os.environ.update(SERVE_ENV)
from bench.common import DATA, figure, machine, median, numpy_topk, timed, write_section  # noqa: E402
from umr.plots import bars  # noqa: E402


def alternating(fns, repeats: int) -> list[float]:
    """Median ms of each function, timed in turn within every repeat so the machine's drift
    falls on all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(1000 * timed(fn, 1)[0])
    return [median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import faiss
    import numpy as np
    import torch

    from umr.index.vector_index import exact_topk
    from umr.retrieval.encoders.towers import TextTower

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100_000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(384)
    flat.add(x)
    rows = []
    times = {}
    for nq in (1, 8, 32):
        q = np.ascontiguousarray(x[rng.choice(len(x), nq)] + 0.05 * rng.standard_normal((nq, 384)).astype(np.float32))
        mine = exact_topk(q, x, 10)[1]
        assert (np.sort(mine, 1) == np.sort(numpy_topk(q, x, 10), 1)).all()
        assert (np.sort(mine, 1) == np.sort(flat.search(q, 10)[1], 1)).all()
        t_mine, t_np, t_faiss = alternating(
            [lambda: exact_topk(q, x, 10), lambda: numpy_topk(q, x, 10), lambda: flat.search(q, 10)], args.repeats)
        times[f"top-10, {nq} queries"] = {"umr (torch GEMM + topk)": t_mine, "numpy": t_np, "FAISS IndexFlatIP": t_faiss}
        rows.append(f"| exact top-10 of 100,000 x 384 | {nq} queries | {t_mine:.1f} | numpy {t_np:.1f} ({t_np / t_mine:.2f}x), "
                    f"FAISS IndexFlatIP {t_faiss:.1f} ({t_faiss / t_mine:.2f}x) |")
    tower = TextTower()
    assert tower.packs
    with open(DATA / "flickr8k-1k" / "captions.txt", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    for n in (8, 32, 256):
        texts = [captions[i] for i in rng.choice(len(captions), n, replace=False)]
        padded = lambda: torch.nn.functional.normalize(tower.padded_mean_pool(texts), dim=-1)  # noqa: E731
        gap = float((tower.features(texts) - padded()).abs().max())
        assert gap < 1e-5
        t_packed, t_padded = alternating([lambda: tower.features(texts), padded], args.repeats)
        times[f"MiniLM, {n} captions"] = {"umr (packed rows)": t_packed, "padded": t_padded}
        rows.append(f"| MiniLM forward, packed rows | {n} captions | {t_packed:.1f} | padded {t_padded:.1f} "
                    f"({t_padded / t_packed:.2f}x); largest difference {gap:.1e} |")
    body = f"""## Search kernels (`bench/search_kernels.py`)

Medians of {args.repeats} timings, the ways taking turns within every repeat, in one process, with `umr serve`'s thread settings;
answers checked equal first (same top-10 ids; vectors within 1e-5); {machine()}.

| kernel | batch | umr ms | the alternative ms (its time / umr's) |
|---|---|---|---|
{chr(10).join(rows)}

{figure("kernels", bars, times, ylabel="ms (median)", title="Search kernels: umr against the alternatives")}
"""
    write_section("kernels", body)


if __name__ == "__main__":
    main()
