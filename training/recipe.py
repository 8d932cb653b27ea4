"""Training recipes: a YAML file listing stages, each starting from the previous stage's weights
(U-MARVEL's progressive transition).

Relative paths in a recipe are resolved against the recipe file's folder, so a recipe runs the
same from any working directory. Unknown keys are errors: a misspelt `lerning_rate` silently
ignored would train something other than what the user wrote. The YAML is validated by pydantic
models (types, ranges, choices; YAML's `1e-4`, a string, is read as the number) and turned into
the frozen dataclasses the runner uses; errors name the stage and the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from umr.index.errors import InvalidArgument


class RecipeError(InvalidArgument):
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
    temperature: float | None = None  # reset the temperature to this; None keeps the encoder's (fresh heads: 0.05)
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _DataIn(_Strict):
    pairs: str | None = None
    split: str | None = None
    images: str | None = None
    caption_template: str = "a photo of a {label}"
    kind: Literal["image-caption", "caption-caption"] = "image-caption"
    queries: str | list[str] = []
    pool: str | list[str] = []
    instructions: str | None = None


class _ContinualIn(_Strict):
    teacher: str
    weight: float = Field(1.0, ge=0)


class _StageIn(_Strict):
    """A stage as written: pydantic checks types, ranges and choices; what spans keys is
    checked after (see _stage)."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    data: _DataIn
    loss: Literal["infonce", "kl", "margin-mse"] = "infonce"
    temperature: float | None = Field(None, gt=0)
    learn_temperature: bool = True
    symmetric: bool = True
    hard_negatives: int = Field(0, ge=0)
    trainable: Literal["heads", "text-head", "image-head", "lora"] = "heads"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    epochs: int = Field(30, ge=1)
    steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    batch_size: int = Field(128, ge=2, description="at least 2: the other rows are the in-batch negatives")
    weight_decay: float = Field(0.5, ge=0)
    seed: int = 0
    continual: _ContinualIn | None = None
    eval: str | None = None


def _problem(err: dict, model: type[BaseModel]) -> str:
    """One pydantic error as a recipe author reads it: the key, then what it must be."""
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _DataIn if loc[:1] == ["data"] else _ContinualIn if loc[:1] == ["continual"] else model
        return f"unknown key(s) {loc[-1]} (allowed: {', '.join(sorted(owner.model_fields))})"
    if kind == "literal_error":
        return f"{key} must be one of {err['ctx']['expected'].replace(' or ', ', ').replace(chr(39), '')}"
    if kind == "missing":
        return {"name": "needs a `name` of letters, digits, - and _", "data": "needs `data:` with at least `pairs:`",
                "continual.teacher": "`continual:` takes {teacher: PREVIOUS_ENCODER, weight: λ}"}.get(key, f"needs `{key}`")
    if kind == "string_pattern_mismatch" and key == "name":
        return "needs a `name` of letters, digits, - and _"
    if kind in ("model_type", "dict_type"):
        return {"data": "needs `data:` with at least `pairs:`",
                "continual": "`continual:` takes {teacher: PREVIOUS_ENCODER, weight: λ}"}.get(key, f"{key} must be a mapping")
    got, ctx = err.get("input"), err.get("ctx", {})
    must = {"greater_than_equal": f"at least {ctx.get('ge')}", "greater_than": f"above {ctx.get('gt')}",
            "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
            "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
            "bool_type": "true or false", "string_type": "a string"}.get(kind)
    if must:
        return f"{key} must be {must}, got {got!r}"
    return f"{key}: {err['msg'][0].lower() + err['msg'][1:]}, got {got!r}"


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
    try:
        given = _StageIn.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{where}: {_problem(e.errors()[0], _StageIn)}") from None
    d = given.data
    listed = {k: tuple(_resolve(base, v) for v in ([getattr(d, k)] if isinstance(getattr(d, k), str) else getattr(d, k)))
              for k in ("queries", "pool")}
    data = StageData(**{**d.model_dump(), **listed, **{k: _resolve(base, getattr(d, k)) for k in
                                                       ("pairs", "split", "images", "instructions")}})
    cont = None
    if given.continual is not None:
        cont = Continual(teacher=_encoder_spec(base, given.continual.teacher), weight=given.continual.weight)
    stage = Stage(**{**given.model_dump(exclude={"data", "continual", "eval"}), "data": data, "continual": cont,
                     "eval": _resolve(base, given.eval)})
    checks = [(bool(data.pairs) != bool(data.queries), "data needs `pairs` or `queries` (M-BEIR), not both"),
              (not data.queries or data.pool, "data.queries needs data.pool (the M-BEIR candidate pool)"),
              (data.kind == "image-caption" or data.pairs, "data.kind applies to pairs only"),
              (stage.hard_negatives == 0 or data.queries, "hard_negatives needs data.queries from `umr mine`"),
              (stage.loss == "infonce" or data.queries, f"loss {stage.loss} needs data.queries from `umr reranker score`")]
    for ok, message in checks:
        if not ok:
            raise RecipeError(f"{where}: {message}")
    for key, value in [("data.pairs", data.pairs), ("data.instructions", data.instructions), ("eval", stage.eval)] + \
            [("data.queries", q) for q in data.queries] + [("data.pool", p) for p in data.pool]:
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
