"""Training recipes: a YAML file listing stages, each starting from the previous stage's weights
(U-MARVEL's progressive transition).

Relative paths in a recipe are resolved against the recipe file's folder, so a recipe runs the
same from any working directory. Unknown keys are errors: a misspelt `lerning_rate` silently
ignored would train something other than what the user wrote.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("infonce", "kl", "margin-mse")
SCHEDULES = ("onecycle", "cosine", "constant")
TRAINABLE = ("heads", "text-head", "image-head", "lora")
DATA_KINDS = ("image-caption", "caption-caption")


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the stage and key."""


@dataclass(frozen=True)
class StageData:
    """Either image-caption `pairs`, or M-BEIR `queries` (with mined `neg_cand_list` or teacher
    lists in them) over a candidate `pool`."""
    pairs: str | None = None  # image-caption pairs (CSV/JSONL/class folders)
    split: str | None = None  # SPLIT.json:NAME
    images: str | None = None
    caption_template: str = "a photo of a {label}"
    kind: str = "image-caption"  # or caption-caption: two captions of one image as query/positive
    queries: tuple[str, ...] = ()  # M-BEIR query JSONL files (`umr mine` / `umr reranker score` output too)
    pool: tuple[str, ...] = ()  # M-BEIR candidate pool JSONL files
    instructions: str | None = None  # M-BEIR query_instructions.tsv


@dataclass(frozen=True)
class Continual:
    teacher: str  # the previous encoder, frozen
    weight: float = 1.0


@dataclass(frozen=True)
class Stage:
    name: str
    data: StageData
    loss: str = "infonce"
    temperature: float = 0.05  # initial temperature when the stage resets it; null keeps the encoder's
    learn_temperature: bool = True
    symmetric: bool = True
    hard_negatives: int = 0  # mined negatives per query added to the in-batch ones
    trainable: str = "heads"  # LiT: heads | text-head | image-head; hf-mllm: lora
    lora_r: int = 8  # when a stage adds LoRA to an MLLM that has none; later stages continue it
    lora_alpha: int = 16
    epochs: int = 30
    steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached first)
    lr: float = 1e-3
    schedule: str = "onecycle"
    batch_size: int = 128
    weight_decay: float = 0.5
    seed: int = 0
    continual: Continual | None = None
    eval: str | None = None  # M-BEIR folder to evaluate on when the stage ends

    def digest(self, start_fingerprint: str) -> str:
        """What makes a finished stage reusable on a rerun: its settings and its starting weights."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "eval"}  # eval does not change weights
        blob = json.dumps({"stage": settings, "start": start_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Recipe:
    encoder: str
    out: str
    stages: list[Stage] = field(default_factory=list)
    source: str | None = None
    flat: bool = False  # one stage written straight into `out` (`umr train --pairs ... --out DIR`)

    def stage_dir(self, i: int) -> Path:
        return Path(self.out) if self.flat else Path(self.out) / f"{i + 1:02d}-{self.stages[i].name}"


def _check_keys(where: str, got: dict, cls) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


_FLOATS = {"temperature", "lr", "weight_decay"}
_INTS = {"hard_negatives", "epochs", "steps", "batch_size", "seed", "lora_r", "lora_alpha"}
_BOOLS = {"learn_temperature", "symmetric"}


def _typed(where: str, key: str, value):
    """YAML reads `1e-4` as a string and `epochs: many` as a string too: convert or refuse."""
    if value is None and key in ("steps", "temperature"):
        return None
    try:
        if key in _FLOATS and not isinstance(value, bool):
            return float(value)
        if key in _INTS and isinstance(value, int) and not isinstance(value, bool):
            return value
        if key in _BOOLS and isinstance(value, bool):
            return value
        if key not in _FLOATS | _INTS | _BOOLS:
            return str(value)
    except (TypeError, ValueError):
        pass
    kind = "a number" if key in _FLOATS else "an integer" if key in _INTS else "true or false"
    raise RecipeError(f"{where}: {key} must be {kind}, got {value!r}")


def _resolve(base: Path, value: str | None) -> str | None:
    """A path relative to the recipe's folder; `SPLIT.json:NAME` keeps its `:NAME`."""
    if value is None:
        return None
    head, sep, tail = str(value).rpartition(":")
    if sep and head.endswith(".json"):
        return f"{_resolve(base, head)}:{tail}"
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _encoder_spec(base: Path, value: str) -> str:
    """A registry spec (lit-base, lit-init:256:0, hf-text:PATH, hf-mllm:PATH; their PATH relative
    to the recipe) or a folder relative to the recipe, which may not exist yet when an earlier
    stage of the same recipe writes it."""
    for prefix in ("hf-mllm:", "hf-text:"):  # a model folder given relative to the recipe
        if value.startswith(prefix):
            return prefix + _resolve(base, value[len(prefix):])
    p = Path(value).expanduser()
    if ":" in value or p.is_absolute() or ("/" not in value and not (base / p).exists()):
        return value
    return os.path.normpath(base / p)


def _stage(i: int, raw: Any, base: Path, defaults: dict) -> Stage:
    where = f"stage {i + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    raw = {**defaults, **raw}
    where = f"stage {i + 1} ({raw.get('name', '?')})"
    _check_keys(where, raw, Stage)
    if "name" not in raw or not str(raw["name"]).replace("-", "").replace("_", "").isalnum():
        raise RecipeError(f"{where}: needs a `name` of letters, digits, - and _")
    data = raw.get("data")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: needs `data:` with at least `pairs:`")
    _check_keys(f"{where} data", data, StageData)
    listed = {k: tuple(_resolve(base, v) for v in ([data[k]] if isinstance(data[k], str) else data[k]))
              for k in ("queries", "pool") if data.get(k)}
    data = StageData(**{**data, **listed, **{k: _resolve(base, data.get(k)) for k in
                                             ("pairs", "split", "images", "instructions")}})
    cont = raw.get("continual")
    if cont is not None:
        if not isinstance(cont, dict) or "teacher" not in cont:
            raise RecipeError(f"{where}: `continual:` takes {{teacher: PREVIOUS_ENCODER, weight: λ}}")
        _check_keys(f"{where} continual", cont, Continual)
        cont = Continual(teacher=_encoder_spec(base, str(cont["teacher"])), weight=float(cont.get("weight", 1.0)))
    typed = {k: _typed(where, k, v) for k, v in raw.items() if k not in ("data", "continual", "eval")}
    stage = Stage(**{**typed, "data": data, "continual": cont, "eval": _resolve(base, raw.get("eval"))})
    checks = [(stage.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
              (stage.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
              (stage.trainable in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}"),
              (data.kind in DATA_KINDS, f"data.kind must be one of {', '.join(DATA_KINDS)}"),
              (bool(data.pairs) != bool(data.queries), "data needs `pairs` or `queries` (M-BEIR), not both"),
              (not data.queries or data.pool, "data.queries needs data.pool (the M-BEIR candidate pool)"),
              (data.kind == "image-caption" or data.pairs, "data.kind applies to pairs only"),
              (stage.epochs >= 1, "epochs must be at least 1"),
              (stage.steps is None or stage.steps >= 1, "steps must be at least 1"),
              (stage.batch_size >= 2, "batch_size must be at least 2 (in-batch negatives)"),
              (stage.lr > 0, "lr must be positive"),
              (stage.temperature is None or stage.temperature > 0, "temperature must be positive"),
              (stage.hard_negatives >= 0, "hard_negatives must be >= 0"),
              (stage.lora_r >= 1 and stage.lora_alpha >= 1, "lora_r and lora_alpha must be at least 1"),
              (stage.hard_negatives == 0 or data.queries, "hard_negatives needs data.queries from `umr mine`"),
              (stage.loss == "infonce" or data.queries, f"loss {stage.loss} needs data.queries from `umr reranker score`"),
              (stage.continual is None or stage.continual.weight >= 0, "continual.weight must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise RecipeError(f"{where}: {message}")
    for key, value in [("pairs", data.pairs), ("instructions", data.instructions), ("eval", stage.eval)] + \
            [("queries", q) for q in data.queries] + [("pool", p) for p in data.pool]:
        if value and not Path(value).exists():
            raise RecipeError(f"{where}: {key} {value} does not exist")
    return stage


def load_recipe(path: str | Path, out: str | None = None) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping with `encoder`, `out` and `stages`")
    base = path.resolve().parent
    top = {"encoder", "out", "stages", "defaults", "continual"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(top))})")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{path}: `stages:` must list at least one stage")
    # `continual:` at the top applies to every stage that does not set its own.
    defaults = dict(raw.get("defaults") or {})
    if raw.get("continual") is not None:
        defaults.setdefault("continual", raw["continual"])
    stages = [_stage(i, s, base, defaults) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: stage names must be unique (got {', '.join(names)})")
    out_dir = out or raw.get("out")
    if not out_dir:
        raise RecipeError(f"{path}: needs `out:` (or pass --out)")
    out_dir = str(Path(out_dir)) if out else os.path.normpath(base / out_dir)
    return Recipe(encoder=_encoder_spec(base, str(raw.get("encoder", "lit-init:256:0"))), out=out_dir,
                  stages=stages, source=str(path))
