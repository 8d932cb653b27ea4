"""`umr train`, `umr eval`, `umr mine` and `umr reranker`: the recipe and what it is judged by."""
from __future__ import annotations

import argparse
import json
import sys

from umr.cli.args import UserError, float_or_zero, fraction, guard_value, positive_float, positive_int


def cmd_train(a) -> int:
    from umr.training import distributed
    from umr.training.recipe import Continual, Recipe, RecipeError, Stage, StageData, load_recipe
    from umr.training.run_recipe import run_recipe

    distributed.init_from_env()  # under `torchrun --nproc_per_node N umr train ...`
    main_rank = distributed.is_main()

    flags = [f for f in ("pairs", "teacher", "split", "images") if getattr(a, f)]
    try:
        if a.recipe:
            if flags:
                raise UserError(f"give a recipe file or --pairs, not both (--{flags[0]} with {a.recipe})")
            recipe = load_recipe(a.recipe, out=a.out)
        else:
            if not a.pairs or not a.out:
                raise UserError("give a RECIPE.yaml, or --pairs and --out for one contrastive stage")
            data = StageData(pairs=a.pairs, split=a.split, images=a.images, caption_template=a.caption_template)
            cont = Continual(a.teacher, a.distill_weight) if a.teacher else None
            stage = Stage(name="train", data=data, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                          weight_decay=a.weight_decay, seed=a.seed, temperature=None, continual=cont)
            recipe = Recipe(encoder=a.encoder, out=a.out, stages=[stage], source="umr " + " ".join(sys.argv[1:]), flat=True)
    except RecipeError as e:
        raise UserError(str(e)) from None

    def evaluate(enc, root):
        from umr.retrieval.evaluation.benchmarks import evaluate_mbeir, format_table

        res = evaluate_mbeir(enc, root)
        print(format_table(res), file=sys.stderr, flush=True)
        return res

    if a.eval:
        import dataclasses

        recipe = dataclasses.replace(recipe, stages=[dataclasses.replace(s, eval=a.eval) for s in recipe.stages])
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main_rank else (lambda msg: None)
    try:
        final = run_recipe(recipe, log=log, evaluate=evaluate)
    except (RecipeError, ValueError) as e:
        raise UserError(str(e)) from None
    if not main_rank:
        return 0
    from umr.retrieval.encoders import load_encoder

    print(f"wrote encoder {final} (fingerprint {load_encoder(str(final), cache=False).fingerprint}); "
          f"use it with --encoder {final}")
    return 0


def task_ids(text: str) -> list[int]:
    """An argparse type: task ids separated by commas."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--task takes task ids separated by commas, e.g. 0,3; got {text!r}") from None


def cmd_eval(a) -> int:
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.evaluation.benchmarks import evaluate_beir, evaluate_mbeir, format_table

    if not a.encoder and not a.index_dir:
        raise UserError("give --encoder SPEC (repeatable) or an index directory whose encoder to evaluate")
    if bool(a.mbeir) == bool(a.beir):
        raise UserError("give exactly one of --mbeir DIR or --beir DIR")
    if a.plot and not a.plot.lower().endswith(".png"):
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, got {a.plot}")
    tasks = a.task
    if a.encoder:
        encoders = [load_encoder(spec) for spec in dict.fromkeys(a.encoder)]
    else:
        from umr.index.manifest import read_manifest
        from umr.retrieval.encoders import load_recorded

        encoders = [load_recorded(read_manifest(a.index_dir)["encoder"])]
    results = []
    for enc in encoders:
        if a.mbeir:
            res = evaluate_mbeir(enc, a.mbeir, a.split, tasks, local=not a.global_pool, instruction=a.instruction,
                                 calibrated=not a.no_calibration, curves=bool(a.plot))
        else:
            res = evaluate_beir(enc, a.beir, a.split, instruction=a.instruction, curves=bool(a.plot))
        results.append(res)
        if not a.json:
            print(format_table(res), flush=True)
    if a.plot:
        from umr.plots import recall_curves

        metric = "hit_rate" if a.mbeir else "recall"
        curves = {r["encoder"]: {task: (t["curve"]["k"], t["curve"][metric]) for task, t in r["tasks"].items()}
                  for r in results}
        where = f"{a.mbeir or a.beir} ({a.split}{', global pool' if a.global_pool else ''})"
        recall_curves(curves, a.plot, "hit rate@k (M-BEIR's Recall@k)" if a.mbeir else "recall@k", where)
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        for r in results:  # the curves are in the figure; the JSON keeps the table's figures
            for t in r["tasks"].values():
                t.pop("curve", None)
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def _window(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    first, _, last = value.partition(":")
    try:
        w = (int(first), int(last))
    except ValueError:
        raise UserError(f"--window takes FIRST:LAST ranks, e.g. 10:50; got {value!r}") from None
    if not 1 <= w[0] <= w[1]:
        raise UserError(f"--window {value}: ranks start at 1 and FIRST <= LAST")
    return w


def cmd_mine(a) -> int:
    from umr.index.atomic import atomic_write_bytes
    from umr.retrieval.encoders import load_encoder
    from umr.training.mining import MiningConfig, mine

    guard = a.guard
    if a.top < 1 or (a.keep is not None and a.keep < 1):
        raise UserError("--top and --keep must be at least 1")
    cfg = MiningConfig(top=a.top, keep=a.keep, window=_window(a.window), guard=guard, local=not a.global_pool, seed=a.seed)
    queries, pool, instructions = _mbeir_inputs(a)
    enc = load_encoder(a.encoder)
    records, stats = mine(enc, queries, pool, cfg, instructions, progress=not a.no_progress)
    atomic_write_bytes(a.out, "".join(json.dumps(r) + "\n" for r in records).encode())
    print(f"wrote {a.out}: {stats.get('negatives', 0)} negatives for {stats.get('queries', 0)} queries "
          f"({'local' if cfg.local else 'global'} pool of {len(pool)}, top {cfg.top}, guard {guard})")
    for key, n in stats.items():
        if key not in ("queries", "negatives"):
            print(f"  {key}: {n}")
    return 0


def _mbeir_inputs(a):
    from umr.retrieval.corpus.mbeir import Instructions, read_sources

    queries, pool = read_sources(a.queries, a.pool)
    return queries, pool, Instructions(a.instructions) if getattr(a, "instructions", None) else None


def cmd_reranker_train(a) -> int:
    from umr.retrieval.rerank.reranker import CrossConfig, LitReranker
    from dataclasses import asdict

    from umr.training.reranker_train import RerankerConfig, train_reranker

    queries, pool, _ = _mbeir_inputs(a)
    cfg = RerankerConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    if a.backbone.startswith("hf-mllm:"):
        from umr.retrieval.rerank.mllm_reranker import MllmReranker

        reranker = MllmReranker.fresh(a.backbone.split(":", 1)[1], a.lora_r, a.lora_alpha)
    elif a.backbone == "lit-cross":
        reranker = LitReranker.fresh(CrossConfig(dim=a.dim, layers=a.layers, seed=a.seed))
    else:
        raise UserError(f"--backbone {a.backbone!r}: use lit-cross or hf-mllm:PATH")

    def log(rec):
        print(f"epoch {rec['epoch']:>3}  loss {rec['loss']:.4f}  pair accuracy {rec['pair_accuracy']:.3f}  "
              f"{rec['pairs_per_s']:.0f} pairs/s", file=sys.stderr, flush=True)

    history = train_reranker(reranker, queries, pool, cfg, log)
    reranker.save(a.out, {"trained_by": "umr reranker train", "command": "umr " + " ".join(sys.argv[1:]),
                          "config": asdict(cfg), "queries": a.queries, "pool": a.pool, "final": history[-1]})
    print(f"wrote re-ranker {a.out} (pair accuracy {history[-1]['pair_accuracy']:.3f} in the last epoch)")
    return 0


def cmd_reranker_score(a) -> int:
    from umr.index.atomic import atomic_write_bytes
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.rerank.reranker import load_reranker
    from umr.training.reranker_train import score_lists

    if not 0 < a.fraction <= 1:
        raise UserError("--fraction is the share of queries to score, in (0, 1]")
    queries, pool, instructions = _mbeir_inputs(a)
    reranker = load_reranker(a.reranker)
    records, stats = score_lists(load_encoder(a.encoder), reranker, queries, pool, a.top, a.weight, a.fraction,
                                 a.seed, not a.global_pool, instructions)
    atomic_write_bytes(a.out, "".join(json.dumps(r) + "\n" for r in records).encode())
    print(f"wrote {a.out}: teacher lists of {a.top} for {stats['queries']} queries (cos + {a.weight} * P(yes))")
    for key, n in stats.items():
        if key != "queries":
            print(f"  {key}: {n}")
    return 0


def add_training_commands(sub) -> None:
    """`umr train` and `umr eval`."""
    t = sub.add_parser("train", help="train a LiT encoder: a staged recipe file, or one contrastive stage from flags")
    t.add_argument("recipe", nargs="?", help="RECIPE.yaml: stages run in order, each from the previous one's weights")
    t.add_argument("--eval", help="M-BEIR folder: evaluate at the end of every stage")
    t.add_argument("--pairs",
                   help="CSV 'image,caption', JSONL {image, text}, or a folder of class folders (captioned by class name)")
    t.add_argument("--caption-template", default="a photo of a {label}", help="caption for class folders")
    t.add_argument("--teacher", help="continual learning: the previous encoder, kept close by embedding distillation")
    t.add_argument("--distill-weight", type=float_or_zero, default=1.0, help="weight λ of the distillation term (with --teacher)")
    t.add_argument("--images", help="folder the image names are relative to (default: images/ beside --pairs)")
    t.add_argument("--split", help="SPLIT.json:NAME, e.g. split.json:train")
    t.add_argument("--encoder", default="lit-init:256:0",
                   help="starting point: lit-init:DIM:SEED (fresh 256-d heads on the frozen towers: the default, "
                        "lit-init:256:0), lit-base or lit-base@1 (the shipped heads, to train further), or a trained directory")
    t.add_argument("--out", help="output folder (overrides the recipe's `out:`)")
    t.add_argument("--epochs", type=positive_int, default=30)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=positive_float, default=1e-3)
    t.add_argument("--weight-decay", type=float_or_zero, default=0.5)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="hit rate@1/5/10 (M-BEIR's Recall@k), recall@10, nDCG@10, MRR@10 on M-BEIR or BEIR data")
    e.add_argument("index_dir", nargs="?", help="evaluate this index's encoder")
    e.add_argument("--encoder", action="append", help="an encoder spec; repeat it to compare encoders side by side")
    e.add_argument("--mbeir", help="M-BEIR folder (query/, cand_pool/, qrels/)")
    e.add_argument("--beir", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    e.add_argument("--split", default="test")
    e.add_argument("--task", type=task_ids, help="task ids, e.g. 0,3 (default: all)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="candidates of the task's target modality (default)")
    g.add_argument("--global", dest="global_pool", action="store_true", help="search the whole mixed pool")
    e.add_argument("--no-calibration", action="store_true",
                   help="with --global: rank the mixed pool by raw cosine (default: calibrated across modalities)")
    e.add_argument("--instruction")
    e.add_argument("--json", action="store_true")
    e.add_argument("--plot", metavar="FILE.png",
                   help="Recall@k curves (k = 1..100) per task, one line per --encoder, as a PNG")
    e.set_defaults(fn=cmd_eval)


def add_mining_commands(sub) -> None:
    """`umr mine` and `umr reranker`."""
    m = sub.add_parser("mine", help="hard negatives for training queries: M-BEIR query lines with neg_cand_list")
    m.add_argument("--encoder", required=True, help="the encoder whose mistakes to mine (the previous stage)")
    m.add_argument("--queries", required=True, nargs="+", help="M-BEIR query JSONL file(s) with pos_cand_list")
    m.add_argument("--pool", required=True, nargs="+", help="M-BEIR candidate pool JSONL file(s)")
    m.add_argument("--out", required=True, help="output JSONL (the queries with neg_cand_list filled)")
    m.add_argument("--top", type=positive_int, default=100, help="candidates retrieved per query")
    m.add_argument("--keep", type=positive_int, default=5, help="negatives kept per query (in rank order; random within --window)")
    m.add_argument("--window", help="FIRST:LAST: take negatives from these ranks only (after positives are dropped)")
    m.add_argument("--guard", type=guard_value, default=0.95,
                   help="drop candidates scoring above this fraction of the positive's score (likely false negatives); 'none' turns it off")
    m.add_argument("--global", dest="global_pool", action="store_true",
                   help="search the whole pool, not only the modality of each task's positives")
    m.add_argument("--instructions", help="M-BEIR query_instructions.tsv: instructions prefixed to the queries")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    m.set_defaults(fn=cmd_mine)

    rr = sub.add_parser("reranker", help="the cross-encoder re-ranker: train it, score teacher lists")
    rsub = rr.add_subparsers(dest="reranker_command", required=True)
    rt = rsub.add_parser("train", help="train on positives against mined negatives (`umr mine` output)")
    rs = rsub.add_parser("score", help="teacher lists for distillation: the student's top N with cos + w * P(yes)")
    for x in (rt, rs):
        x.add_argument("--queries", required=True, nargs="+", help="M-BEIR query JSONL file(s)")
        x.add_argument("--pool", required=True, nargs="+", help="M-BEIR candidate pool JSONL file(s)")
        x.add_argument("--out", required=True)
    rt.add_argument("--epochs", type=positive_int, default=4)
    rt.add_argument("--batch-size", type=positive_int, default=64)
    rt.add_argument("--lr", type=positive_float, default=3e-4)
    rt.add_argument("--backbone", default="lit-cross",
                    help="lit-cross (a small transformer over the lit towers' states) or hf-mllm:PATH (Yes/No)")
    rt.add_argument("--lora-r", type=positive_int, default=8, help="hf-mllm: LoRA rank")
    rt.add_argument("--lora-alpha", type=positive_int, default=16, help="hf-mllm: LoRA alpha")
    rt.add_argument("--dim", type=positive_int, default=128, help="lit-cross: width of the cross transformer")
    rt.add_argument("--layers", type=positive_int, default=2, help="lit-cross: layers")
    rt.add_argument("--seed", type=int, default=0)
    rt.set_defaults(fn=cmd_reranker_train)
    rs.add_argument("--reranker", required=True)
    rs.add_argument("--encoder", required=True, help="the student whose top candidates are scored")
    rs.add_argument("--top", type=positive_int, default=50)
    rs.add_argument("--weight", type=float_or_zero, default=1.0, help="w in cos + w * P(yes)")
    rs.add_argument("--fraction", type=fraction, default=0.1, help="share of the queries, per task")
    rs.add_argument("--seed", type=int, default=42)
    rs.add_argument("--global", dest="global_pool", action="store_true")
    rs.add_argument("--instructions")
    rs.set_defaults(fn=cmd_reranker_score)
