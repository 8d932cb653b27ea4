"""Runs a recipe's stages in order, each from the previous stage's weights.

A stage's folder is a complete encoder (`--encoder OUT/02-images` works) plus `stage.json`,
which records the digest of the stage's settings and starting weights. A rerun skips every
stage whose digest still matches and resumes an interrupted stage from its last epoch
checkpoint; editing a stage invalidates it and every stage after it (their start changed).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from umr.index.atomic import atomic_write_json
from umr.retrieval.encoders import Encoder, load_encoder
from umr.retrieval.encoders.concept import ConceptEncoder
from umr.retrieval.encoders.lit import CONFIG_FILE, LitEncoder
from umr.retrieval.encoders.mllm import MllmEncoder
from umr.retrieval.encoders.tower_encoder import TowerEncoder
from umr.retrieval.corpus.mbeir import Instructions, read_sources
from umr.training import checkpoints, distributed
from umr.training.contrastive import ContrastiveConfig, save_trained, train_examples
from umr.training.examples import Example, FeatureBank, compute_with_progress, mbeir_examples, pair_examples
from umr.training.pairs import read_pairs
from umr.training.recipe import Recipe, RecipeError, Stage

logger = logging.getLogger("umr.training")

STAGE_FILE = "stage.json"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_config(stage: Stage) -> ContrastiveConfig:
    return ContrastiveConfig(
        epochs=stage.epochs, steps=stage.steps, batch_size=stage.batch_size, lr=stage.lr, weight_decay=stage.weight_decay,
        symmetric=stage.symmetric, seed=stage.seed, schedule=stage.schedule, trainable=stage.trainable,
        temperature=stage.temperature, learn_temperature=stage.learn_temperature, kind=stage.data.kind,
        distill_weight=stage.continual.weight if stage.continual else 0.0, loss=stage.loss,
        hard_negatives=stage.hard_negatives)


def finished(stage_dir: Path, digest: str) -> dict | None:
    """The stage record when `stage_dir` holds this exact stage, finished."""
    path = stage_dir / STAGE_FILE
    if not path.exists() or not (stage_dir / CONFIG_FILE).exists():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("digest") == digest and rec.get("status") == "done" else None


def stage_examples(stage: Stage, bank: FeatureBank, encoder: Encoder) -> tuple[list[Example], dict]:
    """The stage's data as examples over the shared bank (LiT: features computed for new items
    only, so stages over the same data share one pass of the towers)."""
    d = stage.data
    if d.pairs:
        pairs = read_pairs(d.pairs, d.images, d.split, d.caption_template)
        examples = pair_examples(pairs, bank, d.kind)
        stats = {"n_pairs": len(pairs), "n_images": len({p.image for p in pairs}), "examples": len(examples)}
        label = Path(d.pairs).name
    else:
        queries, pool = read_sources(d.queries, d.pool)
        examples, stats = mbeir_examples(queries, pool, bank, Instructions(d.instructions) if d.instructions else None,
                                         seed=stage.seed, join=encoder.with_instruction)
        stats["examples"] = len(examples)
        label = ", ".join(Path(q).name for q in d.queries)
    if isinstance(encoder, TowerEncoder):
        compute_with_progress(bank, encoder, label)
    return examples, stats


def run_stage(recipe: Recipe, i: int, start: str, bank: FeatureBank, log: Callable[[str], None],
              evaluate: Callable | None) -> dict:
    stage = recipe.stages[i]
    out = recipe.stage_dir(i)
    enc = load_encoder(start, cache=False)
    if not isinstance(enc, (LitEncoder, ConceptEncoder, MllmEncoder)):
        raise RecipeError(f"stage {stage.name}: starts from {start}, which cannot be trained; recipes train "
                          "lit-base, lit-init:DIM:SEED, lit-concept-init, hf-mllm:PATH or a folder a recipe saved")
    if (stage.trainable == "lora") != isinstance(enc, MllmEncoder):
        raise RecipeError(f"stage {stage.name}: trainable {stage.trainable} does not fit {start}: "
                          "hf-mllm encoders train lora, LiT encoders heads, text-head or image-head")
    start_fp = enc.fingerprint
    digest = stage.digest(start_fp)
    done = finished(out, digest)
    if done:
        log(f"stage {i + 1}/{len(recipe.stages)} {stage.name}: already done ({out}), reusing it")
        return done
    pending = out / STAGE_FILE
    logger.info("stage %d/%d %s: training %s from %s (rank %d)", i + 1, len(recipe.stages), stage.name, stage.trainable,
                start, distributed.world()[0])
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if pending.exists() and json.loads(pending.read_text()).get("digest") != digest:
            checkpoints.clear(out)  # a checkpoint of other settings or other starting weights
        atomic_write_json(pending, {"status": "running", "digest": digest, "start": start,
                                    "start_fingerprint": start_fp, "stage": asdict(stage)})
    distributed.barrier()  # every rank resumes from the same checkpoint, or none
    if isinstance(enc, MllmEncoder) and enc.lora is None:
        enc.add_lora(r=stage.lora_r, alpha=stage.lora_alpha, seed=stage.seed)
    teacher = None
    if stage.continual:
        teacher = load_encoder(stage.continual.teacher)
        if type(teacher) is not type(enc) or teacher.dim != enc.dim:
            raise RecipeError(f"stage {stage.name}: continual.teacher must be a {type(enc).__name__} "
                              f"of dimension {enc.dim}")
    examples, stats = stage_examples(stage, bank, enc)
    cfg = stage_config(stage)
    what = ", ".join(f"{n} {k.removeprefix('n_')}" for k, n in stats.items() if n)
    log(f"stage {i + 1}/{len(recipe.stages)} {stage.name}: {what}, {stage.loss}"
        f"{f' + {stage.hard_negatives} hard negatives' if stage.hard_negatives else ''}, "
        f"trainable {stage.trainable}, lr {stage.lr} ({stage.schedule}), from {start}")
    every = max(1, stage.epochs // 10)

    def on_epoch(rec):
        if rec["epoch"] % every == 0 or rec["epoch"] == stage.epochs:
            log(f"  epoch {rec['epoch']:>4}  step {rec['step']:>5}  loss {rec['loss']:.4f}  "
                f"temperature {rec['temperature']:.4f}  {rec['pairs_per_s']:.0f} pairs/s")

    t0 = time.perf_counter()
    history = train_examples(enc, bank, examples, cfg, on_epoch, teacher=teacher, checkpoint=out, progress=True)
    rec = {"status": "done", "digest": digest, "start": start, "start_fingerprint": start_fp, "fingerprint": enc.fingerprint,
           "stage": asdict(stage), "seconds": round(time.perf_counter() - t0, 1), "final": history[-1] if history else None}
    if distributed.is_main():
        data = {**asdict(stage.data), **stats, "continual": asdict(stage.continual) if stage.continual else None,
                "world_size": distributed.world()[1]}
        command = recipe.source if recipe.flat else f"umr train {recipe.source} (stage {stage.name})"
        save_trained(enc, out, cfg, data, history, command)
        if stage.eval and evaluate:
            rec["eval"] = evaluate(enc, stage.eval)
        atomic_write_json(pending, rec)
        checkpoints.clear(out)
        logger.info("stage %d/%d %s: saved to %s", i + 1, len(recipe.stages), stage.name, out)
    distributed.barrier()  # the next stage starts from this folder on every rank
    return rec


def run_recipe(recipe: Recipe, log: Callable[[str], None] = _stderr, evaluate: Callable | None = None) -> Path:
    """Returns the last stage's folder: the recipe's trained encoder."""
    bank = FeatureBank()
    start = recipe.encoder
    records = []
    for i in range(len(recipe.stages)):
        records.append(run_stage(recipe, i, start, bank, log, evaluate))
        start = str(recipe.stage_dir(i))
    final = recipe.stage_dir(len(recipe.stages) - 1)
    if distributed.is_main():
        atomic_write_json(Path(recipe.out) / "recipe.json", {"source": recipe.source, "encoder": recipe.encoder,
                                                            "final": str(final), "stages": records})
    return final
