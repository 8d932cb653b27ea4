"""FAISS index types and the memory-budget choice between them (autofaiss-style).

All indexes use inner product on L2-normalised vectors, i.e. cosine similarity. Labels are
row numbers within a segment, assigned in insertion order, so a row never changes its label;
deletes are tombstones applied at search time through a FAISS ID selector.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from umr.index.errors import IndexError_, InvalidArgument
from umr.index.index_kinds import check_requested, kind_of

# Below this many vectors an exact scan is fast enough that approximation buys nothing.
EXACT_UP_TO = 100_000


def parse_bytes(text: str | int | None) -> int | None:
    """'4G', '512M', '1.5GiB', 1000 -> bytes."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise InvalidArgument(f"cannot read memory size {text!r}: use a number of bytes or e.g. 512M, 4G") from None


@dataclass
class IndexChoice:
    """Which FAISS index a segment uses, with its parameters and why it was chosen."""

    kind: str
    params: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def traits(self):
        """What this kind is and can do (index/index_kinds.py)."""
        return kind_of(self.kind)

    def factory_string(self) -> str:
        return self.traits.factory_string(self.params)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["factory"] = self.factory_string()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IndexChoice":
        return cls(kind=d["kind"], params=dict(d.get("params", {})), reason=d.get("reason", ""))


def estimated_bytes(kind: str, n: int, dim: int, params: dict | None = None) -> int:
    return kind_of(kind).estimated_bytes(n, dim, params or {})


def choose_index(kind: str, n: int, dim: int, memory_budget: int | None = None) -> IndexChoice:
    """Pick an index kind for `n` vectors of `dim` under `memory_budget` bytes.

    `auto` prefers exact search while it is both affordable and fast, then HNSW (best recall
    per query time) while it fits, then IVF-PQ (compressed codes) sized to the budget.
    """
    if check_requested(kind) != "auto":
        return IndexChoice(kind, kind_of(kind).default_params(n, dim, memory_budget), "requested")
    hnsw = kind_of("hnsw").default_params(n, dim, memory_budget)
    budget_txt = "no memory budget" if memory_budget is None else f"budget {memory_budget} bytes"
    flat_bytes = estimated_bytes("flat", n, dim)
    if n <= EXACT_UP_TO and (memory_budget is None or flat_bytes <= memory_budget):
        return IndexChoice("flat", {}, f"auto: {n} vectors, exact search fits ({flat_bytes} bytes, {budget_txt})")
    hnsw_bytes = estimated_bytes("hnsw", n, dim, hnsw)
    if memory_budget is None or hnsw_bytes <= memory_budget:
        return IndexChoice("hnsw", hnsw, f"auto: {n} vectors, HNSW fits ({hnsw_bytes} bytes, {budget_txt})")
    params = kind_of("ivfpq").default_params(n, dim, memory_budget)
    need = estimated_bytes("ivfpq", n, dim, params)
    if need > memory_budget:
        raise InvalidArgument(
            f"no index fits {n} vectors of dimension {dim} in {memory_budget} bytes; "
            f"the smallest (IVF-PQ, m={params['m']}) needs about {need} bytes: raise --memory-budget"
        )
    return IndexChoice("ivfpq", params, f"auto: HNSW needs {hnsw_bytes} bytes, over the {budget_txt}; IVF-PQ needs {need}")


def choose_trainable(kind: str, n: int, dim: int, memory_budget: int | None = None) -> IndexChoice:
    """choose_index, refused where the choice cannot be trained on `n` vectors."""
    choice = choose_index(kind, n, dim, memory_budget)
    if n < min_training_size(choice):
        raise IndexError_(f"IVF-PQ needs at least {min_training_size(choice)} vectors to train its codebooks, "
                          f"the corpus has {n}; use --index flat or hnsw (or auto) for a corpus this small")
    return choice


def new_index(choice: IndexChoice, dim: int) -> faiss.Index:
    return choice.traits.new_index(dim, choice.params)


def needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


def min_training_size(choice: IndexChoice) -> int:
    return choice.traits.min_training_size(choice.params)


def balanced_sample(modalities: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Row numbers for training a quantizer: an equal share per modality.

    An IVF/PQ trained on image vectors alone places text queries in cells that hold no
    near neighbours (clip-retrieval #76); every modality present must shape the cells.
    """
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(modalities == m) for m in np.unique(modalities)]
    if sum(len(g) for g in groups) <= size:
        return np.arange(len(modalities))
    share = size // len(groups)
    picked, spare = [], 0
    for g in sorted(groups, key=len):
        take = min(len(g), share + spare)
        spare = share + spare - take
        picked.append(rng.choice(g, take, replace=False))
    return np.sort(np.concatenate(picked))


def flat_vectors(index: faiss.Index) -> np.ndarray:
    """Zero-copy (n, d) view of an IndexFlat's stored vectors; valid until the next add."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def as_tensor(x: np.ndarray):
    """A float32 tensor over `x` without a copy; a read-only array (a memory map, bytes from the
    document store) is only ever read, so torch's warning about writing to it does not apply."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


SCORES_BYTES = 64 << 20


def exact_topk(q: np.ndarray, xb, k: int, allowed: np.ndarray | None = None,
               chunk: int = 131_072) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k by matrix products over chunks of the database.

    torch's GEMM and top-k, both on every core and without copying `xb`: for batches of 8-32
    queries about 1.8x faster than numpy's GEMM + single-threaded argpartition and 3-7x faster
    than IndexFlatIP.search on the 2-core machines here; a lone query costs about the same
    either way (docs/benchmarks.md, section kernels). `allowed` masks rows out (deletes, filters).
    `xb` may also be a float32 tensor on a device (a GPU): the products run there. Chunks shrink
    as queries grow, so the scores in flight stay near SCORES_BYTES: 800 queries over chunks of
    131,072 rows held 420 MB of them, what set a build's peak when it tuned recall.
    """
    import torch

    nq, kk = len(q), min(k, len(xb))
    if nq == 0 or kk < 1:
        return np.zeros((nq, max(kk, 0)), dtype=np.float32), np.zeros((nq, max(kk, 0)), dtype=np.int64)
    chunk = min(chunk, max(4096, SCORES_BYTES // (4 * nq)))
    on_device = isinstance(xb, torch.Tensor)  # a DeviceFlat's rows (index/device_flat.py)
    device = xb.device if on_device else torch.device("cpu")
    tq = as_tensor(q).to(device)
    best_s, best_i = [], []
    with torch.inference_mode():
        for start in range(0, len(xb), chunk):
            block = xb[start : start + chunk] if on_device else as_tensor(xb[start : start + chunk])
            scores = tq @ block.T
            if allowed is not None:
                scores[:, torch.from_numpy(~allowed[start : start + chunk]).to(device)] = -math.inf
            s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            best_s.append(s)
            best_i.append(i + start)
        s, i = torch.cat(best_s, 1), torch.cat(best_i, 1)
        if s.shape[1] > k:
            s, pos = torch.topk(s, k, dim=1)
            i = torch.gather(i, 1, pos)
    best_s, best_i = s.cpu().numpy(), i.cpu().numpy()
    # Equal scores in index order, whatever order top-k left them in.
    order = np.lexsort((best_i, -best_s), axis=1)
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def search_params(choice: IndexChoice, selector: faiss.IDSelector | None, k: int):
    """Per-call parameters, so concurrent searches never mutate the shared index."""
    return choice.traits.search_params(selector, k, choice.params)


def bitmap_selector(allowed: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """Selector over rows where `allowed` is True; the packed bitmap must outlive the search."""
    bits = np.packbits(allowed.astype(np.uint8), bitorder="little")
    return faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits)), bits


def write_index(index: faiss.Index, path: str) -> None:
    faiss.write_index(index, path)


def read_index(path: str, mapped: bool = False) -> faiss.Index:
    """`mapped`: an IVF index's inverted lists stay in the file, memory-mapped read-only, so a
    reader's memory holds only the lists its queries touch, as page cache shared by every
    process that maps the same file. Adding to such an index is refused (see `is_mapped`)."""
    if mapped:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(path)


def is_mapped(index: faiss.Index) -> bool:
    """True for an IVF index whose lists are memory-mapped read-only: FAISS aborts the whole
    process (not an exception) on an add to one, so callers must check first."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
