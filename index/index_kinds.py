"""Index kinds as objects: what each FAISS index type is, builds, costs and can do.

The store, the GPU code, verification and tuning ask a kind for its traits (`kind_of(name)`)
instead of comparing names, so a new index type is one subclass and one `register` call here.
FAISS is imported where an index is made or searched: the CLI reads the kinds' names to parse
its arguments and should not pay for loading FAISS to print --help.
"""
from __future__ import annotations

import math

from umr.index.errors import InvalidArgument

HNSW_M = 32
# k-means passes over the training sample; FAISS's default of 25 moves the centroids little
# after 10 on clustered embeddings, and every pass costs sample x nlist x dim.
IVF_TRAIN_ITERATIONS = 10
PQ_SUBQUANTIZERS = (64, 48, 32, 24, 16, 12, 8, 4)
# IVF cells: 4 sqrt(n), at most this many. Training k-means and assigning every vector to a
# cell both cost n x nlist x dim; past ~4096 cells (16M vectors) that grows faster on a CPU
# than the recall it buys at a fixed share of cells probed (10M x 256: 12,649 cells would train
# for hours on 2 cores, 4096 in minutes).
MAX_NLIST = 4096


class IndexKind:
    name = "base"
    # Traits the rest of umr asks about:
    holds_full_vectors = False  # its scores are exact cosines (flat, HNSW): verify compares them with the store
    scanned = False  # searched by a matrix product over every row: torch on any device, masks included
    refines = False  # ranks by compressed codes; the top candidates are re-scored with the exact vectors
    maps_lists = False  # a reader memory-maps its lists from the file, and keeps later rows as a tail
    faiss_gpu = False  # a GPU FAISS copy answers its unmasked searches, where faiss-gpu is installed
    worth_a_thread = False  # large segments of it are searched on the segment threads side by side

    def factory_string(self, params: dict) -> str:
        raise NotImplementedError

    def default_params(self, n: int, dim: int, budget: int | None) -> dict:
        """Its parameters for `n` vectors of `dim` within `budget` bytes (None: no budget)."""
        return {}

    def estimated_bytes(self, n: int, dim: int, params: dict) -> int:
        raise NotImplementedError

    def new_index(self, dim: int, params: dict):
        """A new, empty FAISS index."""
        raise NotImplementedError

    def min_training_size(self, params: dict) -> int:
        return 0

    def search_params(self, selector, k: int, params: dict):
        """Per-call parameters, so concurrent searches never mutate the shared index."""
        import faiss

        return faiss.SearchParameters(sel=selector) if selector is not None else None


class Flat(IndexKind):
    name = "flat"
    holds_full_vectors = scanned = worth_a_thread = True

    def factory_string(self, params):
        return "Flat"

    def estimated_bytes(self, n, dim, params):
        return n * dim * 4

    def new_index(self, dim, params):
        import faiss

        return faiss.IndexFlatIP(dim)


class Hnsw(IndexKind):
    name = "hnsw"
    holds_full_vectors = True

    def default_params(self, n, dim, budget):
        return {"M": HNSW_M, "efConstruction": 80, "efSearch": 128}

    def factory_string(self, params):
        return f"HNSW{params['M']},Flat"

    def estimated_bytes(self, n, dim, params):
        return n * (dim * 4 + params.get("M", HNSW_M) * 2 * 4 + 16)

    def new_index(self, dim, params):
        import faiss

        idx = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = params.get("efConstruction", 80)
        idx.hnsw.efSearch = params.get("efSearch", 128)
        return idx

    def search_params(self, selector, k, params):
        import faiss

        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(params.get("efSearch", 128), k))


class IvfPq(IndexKind):
    name = "ivfpq"
    refines = maps_lists = faiss_gpu = worth_a_thread = True

    def default_params(self, n, dim, budget):
        nlist = int(min(max(16, 4 * math.sqrt(max(n, 1))), max(16, n // 39), MAX_NLIST))
        candidates = [m for m in PQ_SUBQUANTIZERS if dim % m == 0 and m <= dim]
        if not candidates:
            raise InvalidArgument(f"no PQ sub-quantizer count divides dimension {dim}")
        m = candidates[-1]
        for c in candidates:  # largest code that fits: best recall within the budget
            if budget is None or self.estimated_bytes(n, dim, {"m": c, "nlist": nlist}) <= budget:
                m = c
                break
        # refine: re-score the top k*refine PQ candidates with the exact stored vectors.
        # nprobe: recall of PQ codes saturates early (bench/ann.py), so probe ~3% of the cells.
        return {"nlist": nlist, "m": m, "nprobe": int(min(max(16, nlist // 32), 256)), "refine": 10}

    def factory_string(self, params):
        return f"IVF{params['nlist']},PQ{params['m']}x8"

    def estimated_bytes(self, n, dim, params):
        m, nlist = params.get("m", 32), params.get("nlist", 1024)
        return n * (m + 8) + nlist * dim * 4 + 256 * dim * 4

    def new_index(self, dim, params):
        import faiss

        quantizer = faiss.IndexFlatIP(dim)
        idx = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], 8, faiss.METRIC_INNER_PRODUCT)
        idx.nprobe = params.get("nprobe", 16)
        idx.cp.niter = IVF_TRAIN_ITERATIONS
        return idx

    def min_training_size(self, params):
        # k-means wants ~39 points per centroid: 256 per 8-bit PQ codebook, nlist for the cells.
        return 39 * max(params["nlist"], 256)

    def search_params(self, selector, k, params):
        import faiss

        return faiss.SearchParametersIVF(sel=selector, nprobe=params.get("nprobe", 16))


_KINDS: dict[str, IndexKind] = {}


def register(kind: IndexKind) -> IndexKind:
    """Make an index kind known by its name: `--index NAME`, manifests and every trait query."""
    _KINDS[kind.name] = kind
    return kind


for _kind in (Flat(), Hnsw(), IvfPq()):
    register(_kind)


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def check_requested(kind: str) -> str:
    """`kind` as `--index` takes it: auto or a registered kind."""
    if kind != "auto" and kind not in _KINDS:
        raise InvalidArgument(f"unknown index type {kind!r}: use auto, {', '.join(_KINDS)}")
    return kind


def kind_of(name: str) -> IndexKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise InvalidArgument(f"unknown index kind {name!r}: use {', '.join(_KINDS)}") from None
