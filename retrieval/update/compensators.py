"""Query-drift compensators: map a new encoder's query embeddings into an older index's space.

Each compensator is fitted on paired rows, the same items embedded by the new encoder
(`new`, the source) and by the encoder a segment was built with (`old`, the target), and
maps unit vectors to unit vectors. Saved as safetensors arrays plus JSON parameters: nothing
is pickled.

    identity     no change (the segment was built by the active encoder)
    mean         QDC: subtract the mean drift, one vector (Goswami et al., 2025)
    kernel       SDC-style local drift: a similarity-weighted mean of the anchors' drifts
    linear       least squares with ridge toward the identity (or toward zero across dims)
    orthogonal   orthogonal Procrustes about the centroids: the best rotation plus a shift (same dimension only)
    mlp          a small residual MLP trained on cosine loss
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from umr.index.atomic import atomic_write, atomic_write_json

from umr.index.errors import InvalidArgument

# Every compensator class, by kind, in the order registered: `register` is the plug point, and
# the lists below, the CLI's --method choices and its error messages all come from it.
_CLASSES: dict[str, type] = {}
KINDS: tuple[str, ...] = ()
SIMPLEST_FIRST: tuple[str, ...] = ()


def register(cls: type) -> type:
    """Add a Compensator subclass (a class decorator). Its `kind` names it; its `simplicity`
    (fewer parameters: lower) orders the choice among compensators that agree about equally well:
    the simplest generalises best beyond its calibration pairs (bench/continual.py: an MLP fitted
    on 80 class-name prompts tied on held-out prompts and lost 40% of R@5 on real queries)."""
    global KINDS, SIMPLEST_FIRST
    if cls.kind in _CLASSES and _CLASSES[cls.kind] is not cls:
        raise ValueError(f"a compensator of kind {cls.kind!r} is registered already")
    _CLASSES[cls.kind] = cls
    KINDS = tuple(_CLASSES)
    SIMPLEST_FIRST = tuple(sorted(_CLASSES, key=lambda k: _CLASSES[k].simplicity))
    return cls


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Compensator:
    kind = "base"
    simplicity = 0

    def __init__(self, **params):
        self.params = params
        self.arrays: dict[str, np.ndarray] = {}

    def fit(self, new: np.ndarray, old: np.ndarray) -> "Compensator":
        raise NotImplementedError

    def check_dims(self, new: np.ndarray, old: np.ndarray) -> None:
        """For the shifts and rotations, which map within one space."""
        if np.shape(new)[1] != np.shape(old)[1]:
            raise InvalidArgument(f"{self.kind} compensation needs encoders of the same dimension "
                             f"(new {np.shape(new)[1]}, old {np.shape(old)[1]}): use linear or mlp")

    def _map(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, q: np.ndarray) -> np.ndarray:
        return _unit(self._map(np.asarray(q, dtype=np.float32)))

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, name: str) -> dict:
        """Its parameters (JSON) and arrays (safetensors), each written atomically; their names."""
        directory = Path(directory)
        files = {"params": f"{name}.json"}
        atomic_write_json(directory / files["params"], {"kind": self.kind, "params": self.params})
        if self.arrays:
            files["arrays"] = f"{name}.safetensors"
            arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.arrays.items()}
            atomic_write(directory / files["arrays"], lambda tmp: save_file(arrays, tmp))
        return files

    @staticmethod
    def load(directory: str | Path, name: str) -> "Compensator":
        directory = Path(directory)
        spec = json.loads((directory / f"{name}.json").read_text())
        params = dict(spec["params"])
        params.pop("score_map", None)  # written by umr before 2026-12 (index/version_scale.py replaced it)
        comp = make(spec["kind"], **params)
        arrays = directory / f"{name}.safetensors"
        if arrays.exists():
            comp.arrays = dict(load_file(str(arrays)))
        return comp


@register
class Identity(Compensator):
    kind = "identity"
    simplicity = 0

    def fit(self, new, old):
        self.check_dims(new, old)
        return self

    def _map(self, q):
        return q


@register
class MeanShift(Compensator):
    kind = "mean"
    simplicity = 1

    def fit(self, new, old):
        self.check_dims(new, old)
        self.arrays = {"delta": (np.asarray(new) - np.asarray(old)).mean(0, keepdims=True).astype(np.float32)}
        return self

    def _map(self, q):
        return q - self.arrays["delta"]


@register
class KernelShift(Compensator):
    """Drift estimated locally: anchors near the query (in the new space) weigh most."""

    kind = "kernel"
    simplicity = 4

    def __init__(self, sigma: float = 0.05, max_anchors: int = 4096, seed: int = 0):
        super().__init__(sigma=sigma, max_anchors=max_anchors, seed=seed)

    def fit(self, new, old):
        self.check_dims(new, old)
        new, old = np.asarray(new, np.float32), np.asarray(old, np.float32)
        if len(new) > self.params["max_anchors"]:
            keep = np.random.default_rng(self.params["seed"]).choice(len(new), self.params["max_anchors"], replace=False)
            new, old = new[keep], old[keep]
        self.arrays = {"anchors": _unit(new), "drift": new - old}
        return self

    def _map(self, q):
        sims = _unit(q) @ self.arrays["anchors"].T / self.params["sigma"]
        w = np.exp(sims - sims.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return q - w @ self.arrays["drift"]


@register
class Linear(Compensator):
    """old ≈ new @ W + b, ridge-regularised toward W = I when the dimensions agree."""

    kind = "linear"
    simplicity = 3

    def __init__(self, ridge: float = 1.0):
        super().__init__(ridge=ridge)

    def fit(self, new, old):
        new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
        mu_n, mu_o = new.mean(0), old.mean(0)
        x, y = new - mu_n, old - mu_o
        lam = self.params["ridge"]
        prior = np.eye(x.shape[1], y.shape[1]) if x.shape[1] == y.shape[1] else np.zeros((x.shape[1], y.shape[1]))
        w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y + lam * prior)
        self.arrays = {"weight": w.astype(np.float32), "bias": (mu_o - mu_n @ w).astype(np.float32)[None]}
        return self

    def _map(self, q):
        return q @ self.arrays["weight"] + self.arrays["bias"]


@register
class Orthogonal(Compensator):
    kind = "orthogonal"
    simplicity = 2

    def fit(self, new, old):
        self.check_dims(new, old)
        new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
        mu_n, mu_o = new.mean(0), old.mean(0)
        u, _, vt = np.linalg.svd((new - mu_n).T @ (old - mu_o))
        rot = u @ vt
        # rotation about the centroids: translation is part of drift, and a pure rotation misses it
        self.arrays = {"rotation": rot.astype(np.float32), "bias": (mu_o - mu_n @ rot).astype(np.float32)[None]}
        return self

    def _map(self, q):
        return q @ self.arrays["rotation"] + self.arrays["bias"]


@register
class Mlp(Compensator):
    """q -> q @ W0 + relu(q @ W1 + b1) @ W2, trained on 1 - cosine to the old embedding."""

    kind = "mlp"
    simplicity = 5

    def __init__(self, hidden: int = 512, epochs: int = 200, lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0):
        super().__init__(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)

    def fit(self, new, old):
        import torch

        torch.manual_seed(self.params["seed"])
        x = torch.tensor(np.asarray(new, np.float32))
        y = torch.nn.functional.normalize(torch.tensor(np.asarray(old, np.float32)), dim=1)
        init = Linear(ridge=1.0).fit(new, old)
        w0 = torch.nn.Parameter(torch.tensor(init.arrays["weight"]))
        b0 = torch.nn.Parameter(torch.tensor(init.arrays["bias"]))
        w1 = torch.nn.Parameter(torch.randn(x.shape[1], self.params["hidden"]) * x.shape[1] ** -0.5)
        b1 = torch.nn.Parameter(torch.zeros(self.params["hidden"]))
        w2 = torch.nn.Parameter(torch.zeros(self.params["hidden"], y.shape[1]))
        opt = torch.optim.AdamW([w0, b0, w1, b1, w2], lr=self.params["lr"], weight_decay=self.params["weight_decay"])
        for _ in range(self.params["epochs"]):
            out = x @ w0 + b0 + torch.relu(x @ w1 + b1) @ w2
            loss = (1 - torch.nn.functional.cosine_similarity(out, y, dim=1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.arrays = {k: v.detach().numpy() for k, v in dict(w0=w0, b0=b0, w1=w1, b1=b1, w2=w2).items()}
        return self

    def _map(self, q):
        a = self.arrays
        return q @ a["w0"] + a["b0"] + np.maximum(q @ a["w1"] + a["b1"], 0) @ a["w2"]


def make(kind: str, **params) -> Compensator:
    if kind not in _CLASSES:
        raise InvalidArgument(f"unknown compensator {kind!r}: use {', '.join(KINDS)}")
    return _CLASSES[kind](**params)



def agreement_at_k(mapped: np.ndarray, ideal: np.ndarray, corpus: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the top-k a mapped query retrieves with the top-k the ideal query does."""
    from umr.index.vector_index import exact_topk

    _, got = exact_topk(np.ascontiguousarray(mapped, np.float32), corpus, k)
    _, want = exact_topk(np.ascontiguousarray(ideal, np.float32), corpus, k)
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def select(new: np.ndarray, old: np.ndarray, corpus: np.ndarray, kinds=None, holdout: float = 0.2,
           k: int = 10, seed: int = 0, tolerance: float = 0.01) -> tuple[Compensator, list[dict]]:
    """Fit every kind on part of the pairs; judge each on the rest by retrieval agreement with
    the segment's own encoder over `corpus` (the segment's vectors); refit on all pairs the
    simplest kind within `tolerance` of the best agreement."""
    if new.shape == old.shape and np.allclose(new, old, atol=1e-5):
        # Both encoders embed these items alike (a shared text tower): nothing to fit or compare.
        return make("identity").fit(new, old), [{"kind": "identity", "note": "the two encoders embed these pairs "
                                                                               "identically; nothing else was fitted"}]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(new))
    n_test = max(1, int(len(new) * holdout))
    test, train = order[:n_test], order[n_test:]
    table = []
    for kind in kinds or KINDS:
        try:
            comp = make(kind).fit(new[train], old[train])
        except ValueError as e:
            table.append({"kind": kind, "skipped": str(e)})
            continue
        mapped = comp.apply(new[test])
        table.append({"kind": kind, f"agreement@{k}": agreement_at_k(mapped, old[test], corpus, k),
                      "cosine_to_old": float(np.mean(np.sum(mapped * _unit(old[test]), 1)))})
    scored = [r for r in table if "skipped" not in r]
    if not scored:
        raise InvalidArgument("no compensator applies: " + "; ".join(f"{r['kind']}: {r['skipped']}" for r in table))
    top = max(r[f"agreement@{k}"] for r in scored)
    near = [r for r in scored if r[f"agreement@{k}"] >= top - tolerance]
    best = min(near, key=lambda r: SIMPLEST_FIRST.index(r["kind"]))
    return make(best["kind"]).fit(new, old), table
