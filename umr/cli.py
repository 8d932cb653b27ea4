"""The `umr` command: argument parsing and display only; each command imports what it needs."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from umr.index import index_kinds
from umr.retrieval import compensators
from umr.retrieval.numerics import IMAGE_DECODES, PRECISIONS
from umr import __version__
from umr.logs import LEVELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Idle OpenMP workers (torch, FAISS) and OpenBLAS workers (numpy) spin after each call and
# steal the machine's cores from the event loop and from each other; a server wants them asleep
# at once. Set before torch, faiss or numpy is first imported (measured in bench/search.py:
# p50 at concurrency 1 down about 3 ms, micro-batched QPS at concurrency 32 up about 30%).
SERVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


class UserError(Exception):
    """A command line that cannot work; printed as one line."""


def _number(kind, low: float, low_ok: bool, high: float | None = None, what: str = ""):
    """An argparse type: `kind` within bounds, refused with a one-line message otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value < low if low_ok else value <= low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


positive_int = _number(int, 0, False, what="give a whole number of at least 1")
count_or_zero = _number(int, 0, True, what="give 0 or more")
positive_float = _number(float, 0.0, False, what="give a number above 0")
float_or_zero = _number(float, 0.0, True, what="give 0 or more")
fraction = _number(float, 0.0, False, 1.0, what="give a share above 0 and at most 1")
port_number = _number(int, 0, True, 65535, what="ports are 0 (pick a free one) to 65535")
_guard_fraction = _number(float, 0.0, False, 1.5, what="a fraction of the positive's score, e.g. 0.95 (at most 1.5), or none")


def guard_value(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else _guard_fraction(text)


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"id": h.id, "score": round(h.score, 6), **({"rerank": h.details} if h.details else {}),
                           **({"cosine": round(h.cosine, 6)} if h.cosine is not None else {}),
                           **{k: v for k, v in h.doc.to_dict().items() if k != "id"}}
                          for h in hits], indent=2))
        return
    if not hits:
        print("no results")
    if any(h.cosine is not None for h in hits):
        print("scores calibrated across modalities or encoder versions (raw cosine in brackets; --no-calibration ranks "
              "by cosine)")
    for rank, h in enumerate(hits, 1):
        d = h.doc
        what = (d.text or "").replace("\n", " ")
        if len(what) > 90:
            what = what[:87] + "..."
        img = f" [{os.path.basename(d.image)}]" if d.image else ""
        raw = f" [{h.cosine:.4f}]" if h.cosine is not None else ""
        print(f"{rank:>3}. {h.score:.4f}{raw}  {d.id}  ({d.modality}){img}  {what}")


def cmd_index_build(a) -> int:
    from umr.index.vector_index import parse_bytes
    from umr.retrieval.encoders import load_encoder

    if bool(a.vectors) != bool(a.ids):
        raise UserError("--vectors and --ids go together: the embeddings and one id per row")
    if a.vectors and (a.corpus or a.ray):
        raise UserError("--vectors builds from precomputed embeddings: give no corpus and no --ray")
    if not a.vectors and not a.corpus:
        raise UserError("give a corpus to index (or --vectors EMB.npy --ids IDS.jsonl)")
    enc = load_encoder(a.encoder)
    progress = not a.no_progress and not a.json
    if a.vectors:
        from umr.retrieval.vector_import import build_from_vectors

        report = build_from_vectors(a.vectors, a.ids, enc, a.out, modality=a.modality, index_kind=a.index,
                                    memory_budget=parse_bytes(a.memory_budget), batch_size=a.batch_size or 65536,
                                    strict=a.strict, progress=progress, vector_dtype=a.vector_dtype,
                                    target_recall=a.target_recall)
    else:
        from umr.retrieval.pipeline import build_index

        report = build_index(a.corpus, enc, a.out, index_kind=a.index, memory_budget=parse_bytes(a.memory_budget),
                             batch_size=a.batch_size, workers=a.workers, strict=a.strict, corpus_format=a.format,
                             progress=progress, ray=a.ray, shard_size=a.shard_size, vector_dtype=a.vector_dtype,
                             target_recall=a.target_recall)
    if a.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if report.already_complete:
        print(f"{a.out} is already complete ({report.indexed} items indexed); nothing to do")
        return 0
    resumed = f", resumed at record {report.resumed_at}" if report.resumed_at else ""
    print(f"indexed {report.indexed} items into {a.out} ({report.items_per_s:.1f} items/s{resumed}); "
          f"{report.rejected} bad records skipped")
    if report.ray:
        r = report.ray
        print(f"ray: {r['shards']} shards ({r['shards_encoded']} encoded, {r['shards_reused']} reused from an earlier run) "
              f"on {r['actors']} model actor(s); encode {r['encode_s']:.1f}s, merge {r['merge_s']:.1f}s")
    for r in report.rejections[:20]:
        print(f"  skipped {r['id']}: {r['reason']}")
    if report.rejected > 20:
        print(f"  ... {report.rejected - 20} more in `umr index info {a.out} --json`")
    return 0


def cmd_index_add(a) -> int:
    from umr.retrieval.engine import Engine
    from umr.retrieval.pipeline import add_to_index

    eng = Engine.open(a.index_dir)
    try:
        report = add_to_index(eng.store, eng.encoder, a.corpus, batch_size=a.batch_size, workers=a.workers, strict=a.strict,
                              corpus_format=a.format, progress=not a.no_progress)
    finally:
        eng.close()
    print(f"added {report.indexed} items to {a.index_dir}; {report.rejected} bad records skipped")
    for r in report.rejections[:20]:
        print(f"  skipped {r['id']}: {r['reason']}")
    return 0


def cmd_index_delete(a) -> int:
    from umr.index.store import IndexStore

    store = IndexStore.open(a.index_dir)
    try:
        gone = store.delete(a.ids)
        store.record_event("deleted", ids=len(gone))
        store.save()
    finally:
        store.close()
    missing = [i for i in a.ids if i not in gone]
    print(f"deleted {len(gone)} documents" + (f"; not found: {', '.join(missing)}" if missing else ""))
    return 0 if not missing else 1


def cmd_index_verify(a) -> int:
    from umr.index.verify import verify

    report = verify(a.index_dir, repair=a.repair, full=a.full)
    if a.reencode and not report.fatal and not report.unrepairable:
        from umr.retrieval.reencode_check import reencode_check

        reencode_check(a.index_dir, a.reencode, repair=a.repair).add_to(report)
    if a.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.fatal:
        print(f"umr: error: {report.fatal}", file=sys.stderr)
    else:
        for kind, lines in (("checked", report.checked), ("repaired", report.repaired), ("problem", report.problems),
                            ("cannot repair", report.unrepairable)):
            for line in lines:
                print(f"{kind}: {line}")
        if report.ok:
            verdict = "ok"
        elif report.unrepairable:
            verdict = f"{len(report.problems)} problems, {len(report.unrepairable)} kind(s) that --repair cannot mend (above)"
        else:
            verdict = f"{len(report.problems)} problems; `umr index verify {a.index_dir} --repair` rebuilds FAISS from the document store"
        print(f"{a.index_dir}: {verdict}")
    return 0 if report.ok else (2 if report.fatal else 1)


def cmd_index_compact(a) -> int:
    from umr.index.store import IndexStore

    store = IndexStore.open(a.index_dir)
    try:
        dropped = store.compact()
    finally:
        store.close()
    total = sum(dropped.values())
    print(f"compacted {a.index_dir}: dropped {total} dead rows" +
          (" (" + ", ".join(f"segment {s}: {n}" for s, n in dropped.items()) + ")" if dropped else ""))
    return 0


def cmd_index_tune(a) -> int:
    from umr.index.store import IndexStore

    store = IndexStore.open(a.index_dir)
    try:
        found = store.tune(a.target_recall, k=a.k)
    finally:
        store.close()
    if a.json:
        print(json.dumps({str(s): t.to_dict() for s, t in found.items()}, indent=2))
        return 0
    for seg_id, t in found.items():
        said = "reaches" if t.reached else "falls short of"
        print(f"segment {seg_id}: {t.params or 'exact search'}: recall@{t.k} {t.recall:.3f} +- {t.recall_se:.3f} on "
              f"{t.queries} of its own vectors, {said} the target {t.target} (less one standard error); "
              f"{t.ms_per_query:.2f} ms a query here")
    return 0 if all(t.reached for t in found.values()) else 1


def cmd_index_info(a) -> int:
    from umr.index.store import IndexStore

    store = IndexStore.open(a.index_dir, "read")
    try:
        info = store.info()
    finally:
        store.close()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"index {info['path']}  state {info['state']}  documents {info['documents']}")
    enc = info["encoder"]
    print(f"encoder {enc['spec']}  fingerprint {enc['fingerprint']}  dim {enc['dim']}  (version {info['active_version']}, "
          "active: queries and new documents)")
    vec = info["vectors"]
    print(f"exact vectors: {vec['dtype']}, " + ("in a file per segment (segments/N/vectors.*)" if vec["stored_in"] == "files"
                                                else "inside docs.sqlite (an index made before the vector files)"))
    where = info["search"]
    print(f"search runs on: {where['search_device']} (faiss {where['faiss']}"
          f"{', GPU build' if where['faiss_gpu'] else ', CPU build'}; torch CUDA {where['torch_cuda'] or 'none'})")
    if where.get("hint"):
        print(f"  {where['hint']}")
    if len(info["encoders"]) > 1:
        for v in info["encoders"]:
            mark = " (active)" if v["version"] == info["active_version"] else ""
            print(f"encoder version {v['version']}{mark}: {v['spec']}  fingerprint {v['fingerprint']}  dim {v['dim']}")
    for s in info["segments"]:
        idx = s["index"] or {}
        print(f"segment {s['id']} (encoder version {s['encoder_version']}, {s['encoder']['spec']}): {s['documents']} documents "
              f"{s['by_modality']}, {s['deleted_rows']} deleted rows, {idx.get('factory', 'not built')} {idx.get('params', '')}")
        if s.get("search_runs_on"):
            print(f"  searched on: {s['search_runs_on']}")
        if idx.get("reason"):
            print(f"  chosen: {idx['reason']}")
        if idx.get("tuned"):
            t = idx["tuned"]
            print(f"  tuned for recall@{t['k']} {t['target']}: {t['params'] or 'exact search'}, measured "
                  f"{t['recall']:.3f} on {t['queries']} of its own vectors" + ("" if t["reached"] else " (short of it)"))
        if len(s["by_modality"]) > 1:
            from umr.index.modality_calibration import MIN_DOCUMENTS

            pairs = ", ".join(s["modality_calibration"]) or "none"
            few = [f"{m} ({n})" for m, n in s["by_modality"].items() if n < MIN_DOCUMENTS]
            print(f"  scores calibrated across modalities for query>document: {pairs}"
                  + (f"; too few documents for tables (a modality needs {MIN_DOCUMENTS}): {', '.join(few)}, "
                     "so searches that include them rank by raw cosine" if few else ""))
        for version, comps in s.get("compensators", {}).items():
            print(f"  version {version} queries reach it through: "
                  + ", ".join(f"{m} -> {c['kind']} ({c['pairs']} pairs)" for m, c in comps.items()))
            for m, c in comps.items():
                if c.get("scales"):
                    print(f"    {m} queries, scores onto version {version}'s scale: "
                          + ", ".join(f"{'all documents' if k == '*' else k + ' documents'} {a:.3f} x cosine {b:+.3f}"
                                      for k, (a, b) in c["scales"].items()))
    rep = info["build"].get("report")
    if rep:
        print(f"build: {rep['indexed']} indexed, {rep['rejected']} rejected, {rep.get('items_per_s', 0)} items/s")
    return 0


def _use_reranker(eng, a) -> None:
    if bool(a.reranker) != bool(a.rerank):
        raise UserError("re-ranking needs both --reranker DIR and --rerank K")
    if a.reranker:
        from umr.retrieval.reranker import load_reranker

        eng.use_reranker(load_reranker(a.reranker), a.rerank, a.rerank_weight)


def _rerank_flags(parser) -> None:
    parser.add_argument("--reranker", help="a re-ranker from `umr reranker train`")
    parser.add_argument("--rerank", type=positive_int, metavar="K", help="re-rank the top K with cos + w * P(yes)")
    parser.add_argument("--rerank-weight", type=float_or_zero, default=1.0, help="w in cos + w * P(yes)")


def cmd_search(a) -> int:
    from umr.retrieval.engine import Engine, Query
    from umr.retrieval.filters import parse_filter
    from umr.retrieval.items import parse_modalities

    if not a.text and not a.image:
        raise UserError("give a query text, --image PATH, or both")
    flt = parse_filter(a.filter)
    eng = Engine.open(a.index_dir, a.encoder, mode="read")
    if not eng.store.docs.checked:
        print(f"umr: note: {a.index_dir}'s document store is too large to check before every search; "
              f"`umr index verify {a.index_dir}` checks it", file=sys.stderr)
    try:
        _use_reranker(eng, a)
        hits = eng.search([Query(a.text, a.image, a.instruction)], a.k, parse_modalities(a.modality), flt,
                          calibrated=not a.no_calibration)[0]
    finally:
        eng.close()
    _print_hits(hits, a.json)
    return 0


def _without_replicas(argv: list[str]) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--replicas":
            skip = True
        elif not tok.startswith("--replicas="):
            out.append(tok)
    return out


def cmd_serve(a) -> int:
    if a.replicas > 1:
        if a.replica_name:
            raise UserError("--replicas starts its own replicas: a replica cannot start more")
        from umr.server.replicas import supervise

        try:
            return supervise(_without_replicas(a.argv), a.replicas, a.host, a.port, a.read_only)
        except OSError as e:
            raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    import uvicorn

    from umr.retrieval.engine import Engine
    from umr.server.app import create_app, uvicorn_config
    from umr.server.settings import ServerSettings

    admin_key = os.environ.get("UMR_ADMIN_KEY")
    if a.admin_key_file:
        try:
            admin_key = open(a.admin_key_file).read().strip()
        except OSError as e:
            raise UserError(f"cannot read --admin-key-file: {e.strerror}") from None
    keys, key_file = _serve_keys(a)
    settings = ServerSettings(micro_batching=not a.no_batching, batch_max_size=a.max_batch,
                              batch_max_wait_ms=a.max_wait_ms, max_k=a.max_k, admin_key=admin_key or None,
                              keys=keys, public_read=a.public_read, checkpoint_every_rows=a.checkpoint_rows,
                              checkpoint_every_s=a.checkpoint_seconds, follow_every_s=a.follow_interval,
                              writer_url=a.writer_url, replica_name=a.replica_name, key_file=key_file)
    eng = Engine.open(a.index_dir, a.encoder, mode="read" if a.read_only else "write")
    _use_reranker(eng, a)
    app = create_app(eng, settings)
    if keys or admin_key:
        access = f"{len(keys) if keys else 0} API keys from {key_file}" if keys else "the admin key only"
        print(f"access: {access}; writes need a write key, reads {'are public' if a.public_read else 'need a read key'}")
    else:
        print("access: no API key configured: anyone who can reach this port can search, add and delete "
              "(make keys with `umr keys add --scope write`)")
    # Bound only now, with the engine loaded: a replica that listened while loading would hold its
    # share of the port's new connections waiting (server/replicas.py).
    from umr.server.replicas import bind

    try:
        sockets = [bind(a.host, a.port, shared=a.reuse_port)]
        if a.private_port:
            sockets.append(bind("127.0.0.1", a.private_port, shared=True))
    except OSError as e:
        eng.close()
        raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    print(f"serving {a.index_dir} ({eng.store.count()} documents, encoder {eng.encoder.spec}) on "
          f"http://{a.host}:{sockets[0].getsockname()[1]}  (OpenAPI docs at /docs)", flush=True)
    from umr.server.request_log import install_filter

    install_filter()  # every log line made while a request is handled carries its id
    uvicorn.Server(uvicorn_config(app, a.trusted_proxy)).run(sockets=sockets)
    st = app.state.umr
    st.engine.close()
    return 0


def _serve_keys(a):
    """The key ring `umr serve` uses: --key-file, else $UMR_KEY_FILE or the default file when it exists."""
    from umr.server.keys import KeyRing, default_key_file

    path = Path(a.key_file) if a.key_file else default_key_file()
    if not a.key_file and not path.exists():
        return None, None
    ring = KeyRing.load(path)
    return (ring if len(ring) else None), path


def cmd_keys(a) -> int:
    from umr.server.keys import add_key, default_key_file, list_keys, revoke_key

    path = Path(a.file) if a.file else default_key_file()
    if a.keys_command == "add":
        key, entry = add_key(path, a.scope, a.name)
        print(key)
        print(f"added key {entry.name!r} (scope {entry.scope}) to {path}; this is the only time the key is shown",
              file=sys.stderr)
    elif a.keys_command == "revoke":
        revoke_key(path, a.name)
        print(f"revoked key {a.name!r} in {path}; servers using this file refuse it within a second")
    else:
        entries = list_keys(path)
        for e in entries:
            print(f"{e.name}\t{e.scope}\t{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}")
        if not entries:
            print(f"no keys in {path}", file=sys.stderr)
    return 0


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
        from umr.retrieval.evaluation import evaluate_mbeir, format_table

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
    from umr.retrieval.evaluation import evaluate_beir, evaluate_mbeir, format_table

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


def cmd_update(a) -> int:
    from umr.index.store import IndexStore
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.update import describe_interval, fit_update, registered_encoder

    if a.reindex_sample and not (a.eval or a.eval_new):
        raise UserError("--reindex-sample compares on judged queries: give --eval QUERIES too")
    if a.plot and not (a.eval or a.eval_new):
        raise UserError("--plot draws the --eval comparison: give --eval QUERIES too")
    if a.plot and not a.plot.lower().endswith(".png"):
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, got {a.plot}")
    if (a.encoder is None) == (a.to is None):
        raise UserError("umr update takes --encoder SPEC (a new encoder) or --to VERSION (one the index has registered)")
    # Registering only (--no-activate) needs no write lock: it is allowed beside a running server.
    store = IndexStore.open(a.index_dir, "read" if a.no_activate else "write")
    try:
        if not store.ready:
            raise UserError(f"{a.index_dir} is not finished; complete its build first")
        new = load_encoder(a.encoder) if a.encoder is not None else registered_encoder(store, a.to)
        report = fit_update(store, new, a.calibration, a.method, a.sample, activate=not a.no_activate,
                            eval_path=a.eval, force=a.force, reindex_sample=a.reindex_sample, eval_new_path=a.eval_new,
                            eval_docs=a.eval_docs)
    finally:
        store.close()
    if a.plot:
        _plot_update(report, new.spec, a.plot)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    if a.to is not None:
        state = "active again" if report["active_version"] == report["version"] else "ready to activate again"
        print(f"encoder version {report['version']} ({new.spec}) is {state}: compensators from its queries into the "
              f"segments other versions embedded fitted in {report['seconds']:.1f}s; no document was re-embedded")
    else:
        print(f"registered {new.spec} as encoder version {report['version']} (active: {report['active_version']}) "
              f"in {report['seconds']:.1f}s; no document was re-embedded")
    for seg in report["segments"]:
        for note in seg.get("notes", []):
            print(f"  segment {seg['segment']} (v{seg['segment_version']}): {note}")
        for modality, r in seg["modalities"].items():
            if r["status"] != "ok":
                print(f"  segment {seg['segment']} (v{seg['segment_version']}), {modality} queries: {r['status']}")
                continue
            cols = ", ".join(f"{row['kind']} {row['agreement@10']:.3f}" if "agreement@10" in row else row.get("note", row["kind"])
                             for row in r["comparison"] if "skipped" not in row)
            print(f"  segment {seg['segment']} (v{seg['segment_version']}), {modality} queries: {r['chosen']} "
                  f"from {r['pairs']} pairs ({', '.join(r['sources'])}); agreement@10 on held-out pairs: {cols}")
    if "preview" in report:
        pv = report["preview"]
        print(f"  with the {pv['added']} documents of {a.eval_docs} added (on copies of the index), hit rate@5:")
        for variant, by_set in pv["hit_rate@5"].items():
            print(f"    {variant}: " + ", ".join(f"{name} queries {v:.3f}" for name, v in by_set.items()))
    for key, path, label in (("eval", a.eval, "old-domain queries"), ("eval_new", a.eval_new, "new-domain queries")):
        if key not in report:
            continue
        ev = report[key]
        if not ev["judged_in_index"]:
            print(f"  {path}: none of the {ev['queries']} {label}' relevant documents are in the index yet"
                  + ("" if a.eval_docs else "; --eval-docs CORPUS scores them with the documents added"))
            continue
        print(f"  hit rate@5 on {path} ({ev['queries']} {label}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ev["hit_rate@5"].items()))
        print(f"    chosen against the old encoders: {describe_interval(ev['chosen against old'])}")
        if "reindex_sample" in ev:
            rs = ev["reindex_sample"]
            print(f"    on a sample of {rs['documents']} documents: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in rs.items() if k != "documents"))
    return 0


def _plot_update(report: dict, spec: str, out: str) -> None:
    """The comparison `--eval` prints, as bars: per query set, every variant's hit rate@5."""
    from umr.plots import bars

    groups = {}
    for key, label in (("eval", "old-domain queries (--eval)"), ("eval_new", "new-domain queries (--eval-new)")):
        ev = report.get(key)
        if not ev or not ev["judged_in_index"]:
            continue
        groups[f"{label}, {ev['queries']}"] = dict(ev["hit_rate@5"])
        if "reindex_sample" in ev:
            rs = ev["reindex_sample"]
            groups[f"{label} on a sample of {rs['documents']} documents"] = {
                "old encoders": rs["old encoders on the sample"], "re-indexed with the new encoder": rs["new encoder re-indexed on the sample"]}
    if not groups:
        raise UserError("--plot: none of the --eval queries' relevant documents are in the index, so there is nothing to draw")
    name = spec if len(spec) <= 60 else "..." + spec[-57:]
    bars(groups, out, "hit rate@5", f"umr update --encoder {name}: with and without compensation", highlight="chosen",
         ylim=(0, 1.05))
    print(f"wrote {out}", file=sys.stderr)


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
    from umr.retrieval.mbeir import Instructions, read_sources

    queries, pool = read_sources(a.queries, a.pool)
    return queries, pool, Instructions(a.instructions) if getattr(a, "instructions", None) else None


def cmd_reranker_train(a) -> int:
    from umr.retrieval.reranker import CrossConfig, LitReranker
    from dataclasses import asdict

    from umr.training.reranker_train import RerankerConfig, train_reranker

    queries, pool, _ = _mbeir_inputs(a)
    cfg = RerankerConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    if a.backbone.startswith("hf-mllm:"):
        from umr.retrieval.mllm_reranker import MllmReranker

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
    from umr.retrieval.reranker import load_reranker
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


def cmd_demo(a) -> int:
    from umr.demo import run_demo

    return run_demo(a.out, a.port)


def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "folder", "mbeir"])
    p.add_argument("--batch-size", type=positive_int,
                   help="items per batch (default 64 on a CPU, 256 on a GPU; 65536 with --vectors)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="image decoding threads (default: one per core, at most 32)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--no-progress", action="store_true")


class Parser(argparse.ArgumentParser):
    """A bad command line gets one line naming the problem and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="umr", description="Universal multimodal retrieval.")
    p.add_argument("--version", action="version", version=f"umr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="build and maintain indexes").add_subparsers(dest="index_command", required=True)
    b = ix.add_parser("build", help="index a corpus (JSONL, image folder, M-BEIR pool); resumable")
    b.add_argument("corpus", nargs="?", help="JSONL, image folder or M-BEIR pool (or --vectors and --ids)")
    b.add_argument("--encoder", default="lit-base")
    b.add_argument("--vectors", metavar="EMB.npy", help="precomputed embeddings, one row per document (no encoder runs; "
                   "--encoder names the model that made them)")
    b.add_argument("--ids", metavar="IDS.jsonl", help="with --vectors: one id (or {id, text, image, metadata}) per row")
    b.add_argument("--modality", default="image", choices=["image", "text", "image,text"],
                   help="with --vectors: the modality of records that do not say (default image)")
    b.add_argument("--out", required=True)
    b.add_argument("--index", default="auto", choices=["auto", *index_kinds.names()])
    b.add_argument("--memory-budget", help="e.g. 2G; --index auto picks an index that fits")
    b.add_argument("--vector-dtype", default="float32", choices=["float32", "float16"],
                   help="how the exact vectors for re-scoring are kept on disk: float16 takes half the space "
                        "(cosine 0.9999 to float32)")
    b.add_argument("--target-recall", type=float, metavar="R",
                   help="tune the search parameters (nprobe, refine depth, efSearch) on a sample of the index's own "
                        "vectors for recall@10 of at least R, e.g. 0.95, at the least cost measured")
    _ingest_args(b)
    b.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="encode on a Ray cluster: auto (the one on this machine, else a local one) or a head "
                        "node's address; needs umr[distributed]")
    b.add_argument("--shard-size", type=positive_int, default=4096,
                   help="records per shard of a --ray build (the unit a rerun resumes by)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_index_build)
    ad = ix.add_parser("add", help="add a corpus to an index without rebuilding it")
    ad.add_argument("index_dir")
    ad.add_argument("corpus")
    _ingest_args(ad)
    ad.set_defaults(fn=cmd_index_add)
    de = ix.add_parser("delete", help="delete documents by id")
    de.add_argument("index_dir")
    de.add_argument("ids", nargs="+")
    de.set_defaults(fn=cmd_index_delete)
    inf = ix.add_parser("info", help="what an index holds and how it was built")
    inf.add_argument("index_dir")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(fn=cmd_index_info)
    ve = ix.add_parser("verify", help="check every file of an index against the others (read-only unless --repair)")
    ve.add_argument("index_dir")
    ve.add_argument("--repair", action="store_true",
                    help="rebuild FAISS checkpoints that disagree with the document store, from it")
    ve.add_argument("--full", action="store_true",
                    help="compare every FAISS row with its stored vector (default: a sample of 1,000 per segment)")
    ve.add_argument("--reencode", type=count_or_zero, default=0, metavar="N",
                    help="also embed N stored documents again and compare them with their stored vectors "
                         "(with --repair: replace those that differ)")
    ve.add_argument("--json", action="store_true")
    ve.set_defaults(fn=cmd_index_verify)
    co = ix.add_parser("compact", help="drop dead rows left by deleted and replaced documents, rebuild their FAISS")
    co.add_argument("index_dir")
    co.set_defaults(fn=cmd_index_compact)
    tu = ix.add_parser("tune", help="pick search parameters (nprobe, refine, efSearch) for a recall target, measured on "
                                    "the index's own vectors; every process that opens the index then uses them")
    tu.add_argument("index_dir")
    tu.add_argument("--target-recall", type=float, required=True, metavar="R", help="e.g. 0.95")
    tu.add_argument("--k", type=positive_int, default=10, help="recall@k (default 10)")
    tu.add_argument("--json", action="store_true")
    tu.set_defaults(fn=cmd_index_tune)

    s = sub.add_parser("search", help="search an index from the command line")
    s.add_argument("index_dir")
    s.add_argument("text", nargs="?")
    s.add_argument("--image", help="query image path (with TEXT: an image+text query)")
    s.add_argument("--modality", help="only results of: image, text, image,text (join several with |)")
    s.add_argument("--instruction")
    s.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata equality, repeatable; numbers and true/false are typed (year=2020), quotes keep a string (name=\"2020\")")
    s.add_argument("-k", type=positive_int, default=10)
    s.add_argument("--encoder", help="query encoder (default: the index's)")
    s.add_argument("--no-calibration", action="store_true",
                   help="rank by raw cosine even over documents of several modalities (default: calibrated scores)")
    s.add_argument("--json", action="store_true")
    _rerank_flags(s)
    s.set_defaults(fn=cmd_search)

    sv = sub.add_parser("serve", help="serve an index over HTTP")
    sv.add_argument("index_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=port_number, default=8000)
    sv.add_argument("--encoder")
    sv.add_argument("--max-batch", type=positive_int, default=32, help="most queries per encoder forward")
    sv.add_argument("--max-wait-ms", type=float_or_zero, default=5.0,
                    help="longest wait for the clients of the last batch to come back (a lone client never waits)")
    sv.add_argument("--max-k", type=positive_int, default=1000)
    sv.add_argument("--no-batching", action="store_true")
    sv.add_argument("--admin-key-file", help="file holding the admin API key (or set UMR_ADMIN_KEY)")
    sv.add_argument("--key-file", help="API keys made by `umr keys add` (default: $UMR_KEY_FILE or "
                                       "~/.config/umr/keys.json when it exists)")
    sv.add_argument("--public-read", action="store_true", help="with keys configured, searches and reads need no key")
    sv.add_argument("--read-only", action="store_true",
                    help="serve searches only: take no write lock, write nothing, refuse adds and deletes "
                         "(beside another server or a build of the same index)")
    sv.add_argument("--checkpoint-rows", type=count_or_zero, default=10_000,
                    help="checkpoint FAISS in the background after this many added rows (0: never by count)")
    sv.add_argument("--checkpoint-seconds", type=float_or_zero, default=30.0,
                    help="... or this long after the first add since the last checkpoint (0: never by time)")
    sv.add_argument("--replicas", type=positive_int, default=1,
                    help="serving processes on the one port: the index's writer and N-1 read-only replicas that "
                         "follow it and relay writes to it (each gets cores/N threads)")
    sv.add_argument("--follow-interval", type=float_or_zero, default=0.25, metavar="SECONDS",
                    help="how often a read-only server or replica looks for the writer's commits (0: never)")
    sv.add_argument("--trusted-proxy", action="append", metavar="ADDRESS",
                    help="a reverse proxy's address whose X-Forwarded-For / X-Forwarded-Proto headers are believed "
                         "(repeatable; default: none, the connection's own address is the client's)")
    sv.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    sv.add_argument("--private-port", type=int, help=argparse.SUPPRESS)
    sv.add_argument("--writer-url", help=argparse.SUPPRESS)
    sv.add_argument("--replica-name", help=argparse.SUPPRESS)
    _rerank_flags(sv)
    sv.set_defaults(fn=cmd_serve)

    ks = sub.add_parser("keys", help="API keys for `umr serve`, with scopes read, write, admin (only hashes are stored)")
    ksub = ks.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="make a key and print it (once)")
    ka.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    ka.add_argument("--name", help="a name to revoke it by (default: SCOPE-N)")
    kl = ksub.add_parser("list", help="names, scopes and dates of the keys (never the keys)")
    kr = ksub.add_parser("revoke", help="remove a key by name")
    kr.add_argument("name")
    for kp in (ka, kl, kr):
        kp.add_argument("--file", help="key file (default: $UMR_KEY_FILE or ~/.config/umr/keys.json)")
    ks.set_defaults(fn=cmd_keys)

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

    u = sub.add_parser("update", help="put a new encoder in front of an index without re-indexing it")
    u.add_argument("index_dir")
    u.add_argument("--encoder", help="the new encoder (a spec or a trained directory)")
    u.add_argument("--to", type=positive_int, metavar="VERSION",
                   help="go back (or forward) to an encoder version the index has registered: fits compensators "
                        "from its queries into the segments other versions embedded, with the same guard")
    u.add_argument("--calibration", action="append",
                   help="'corpus' (the index's stored items), 'passages' (sentences of its stored texts, embedded by the "
                        "old encoder too), 'generic' (umr's own generic queries nearest the index's documents) or a "
                        "JSONL of queries; repeatable; default: corpus and passages, and generic where the index holds "
                        "no texts")
    u.add_argument("--method", default="auto", choices=["auto", *compensators.KINDS],
                   help="the compensator: auto picks by retrieval agreement, the simplest of the best")
    u.add_argument("--sample", type=positive_int, default=2000, help="calibration pairs per modality and source")
    u.add_argument("--eval", help="queries with judgements (M-BEIR query JSONL, or {text, image, relevant}); "
                                 "activation is refused if the compensated new encoder retrieves worse than the old")
    u.add_argument("--eval-new", metavar="QUERIES",
                   help="judged queries of the new domain, scored like --eval beside it (what the update buys); never refuses")
    u.add_argument("--eval-docs", metavar="CORPUS",
                   help="documents to be added after the update: score --eval and --eval-new with them added, "
                        "keeping the old encoder and updating, on temporary copies of the index")
    u.add_argument("--force", action="store_true",
                   help="activate even when --eval says it is worse, or a query modality the index answers would be refused")
    u.add_argument("--reindex-sample", type=positive_int, metavar="N",
                   help="with --eval: also re-embed the judged documents plus N others with the new encoder")
    u.add_argument("--no-activate", action="store_true",
                   help="register and fit only; a running server activates it with POST /v1/admin/encoder")
    u.add_argument("--json", action="store_true")
    u.add_argument("--plot", metavar="FILE.png", help="the --eval comparison as a bar chart (PNG)")
    u.set_defaults(fn=cmd_update)

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

    d = sub.add_parser("demo", help="index the bundled sample corpus, serve it, query it over HTTP")
    d.add_argument("--out", default=None, help="index directory (default: a temporary one)")
    d.add_argument("--port", type=port_number, default=0, help="0 picks a free port")
    d.set_defaults(fn=cmd_demo)
    for leaf in _leaf_parsers(p):
        leaf.add_argument("--log-level", choices=LEVELS, default="warning",
                          help="umr's log messages on stderr from this level (default: warning; info logs each HTTP request)")
        leaf.add_argument("--log-format", choices=("text", "json"), default="text",
                          help="json: one object per line, with the request id on every line a request caused")
        leaf.add_argument("--device", help="where encoders run, and FAISS with faiss-gpu installed: auto (the default, "
                                           "or $UMR_DEVICE: cuda when torch sees a GPU), cpu, cuda, cuda:N")
        leaf.add_argument("--precision", choices=PRECISIONS,
                          help="the encoders' forward passes: float32 (the default, or $UMR_PRECISION) or float16 "
                               "autocast, within cosine 0.999 of float32 and faster on a GPU")
        leaf.add_argument("--image-decode", choices=IMAGE_DECODES,
                          help="where JPEGs are decoded and resized: cpu (the default, or $UMR_IMAGE_DECODE, worker "
                               "threads) or device (torchvision's decoder on the --device, nvJPEG on a GPU)")
    return p


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for choice in dict.fromkeys(subs[0].choices.values()):  # aliases share a parser
        yield from _leaf_parsers(choice)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "serve":
        for key, value in SERVE_ENV.items():
            os.environ.setdefault(key, value)
    from umr import logs

    logs.configure(args.log_level, args.log_format)
    from umr.index.errors import UmrError

    try:
        if args.device:
            from umr.retrieval.device import choose

            choose(args.device)
        from umr.retrieval import numerics

        numerics.choose(args.precision, args.image_decode)
        return args.fn(args)
    except BrokenPipeError:  # `umr search ... | head` closed the pipe: what was wanted has been read
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell tool stopped by the closed pipe exits
    except (UserError, UmrError, OSError) as e:  # raised on purpose, or a file's or the network's: the user's to fix
        print(f"umr: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("umr: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: show where, and ask for the report
        import traceback

        traceback.print_exc()
        print(f"umr: internal error (umr {__version__}, `umr {args.command}`): this is a bug in umr, not in your input. "
              "Please report it with the traceback above.", file=sys.stderr)
        return 70


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of the closed pipe does not
    print a second Broken pipe error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (redirected in-process)
        pass


def one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else e.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
