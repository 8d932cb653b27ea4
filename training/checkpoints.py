"""Epoch checkpoints for resumable training: one safetensors file (never pickle), replaced
atomically, so a crash leaves the previous epoch's checkpoint whole.

The optimizer state is flattened into named tensors (`opt.<param index>.<key>`); its settings
are rebuilt by the caller, which constructs the optimizer the same way on resume. The epoch
count and loss history ride in the file's metadata, so tensors and counters cannot disagree.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from umr.index.atomic import atomic_write

FILE = "checkpoint.safetensors"


def save(directory: str | Path, module: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
         history: list[dict]) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    meta = {"epoch": str(epoch), "history": json.dumps(history)}
    atomic_write(Path(directory) / FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))


def restore(directory: str | Path, module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """(epochs already done, their history); (0, []) when there is nothing to resume."""
    path = Path(directory) / FILE
    if not path.exists():
        return 0, []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            per_param.setdefault(int(i), {})[key] = v
    state["state"] = per_param
    opt.load_state_dict(state)
    return int(meta["epoch"]), json.loads(meta["history"])


def clear(directory: str | Path) -> None:
    (Path(directory) / FILE).unlink(missing_ok=True)
