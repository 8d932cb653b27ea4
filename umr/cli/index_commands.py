"""`umr index build|add|delete|info|verify|compact|tune`."""
from __future__ import annotations

import json
import sys

from umr.cli.args import UserError, ingest_flags, count_or_zero, positive_int
from umr.index import index_kinds


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
        from umr.retrieval.indexing.vector_import import build_from_vectors

        report = build_from_vectors(a.vectors, a.ids, enc, a.out, modality=a.modality, index_kind=a.index,
                                    memory_budget=parse_bytes(a.memory_budget), batch_size=a.batch_size or 65536,
                                    strict=a.strict, progress=progress, vector_dtype=a.vector_dtype,
                                    target_recall=a.target_recall)
    else:
        from umr.retrieval.indexing.pipeline import build_index

        report = build_index(a.corpus, enc, a.out, index_kind=a.index, memory_budget=parse_bytes(a.memory_budget),
                             batch_size=a.batch_size, workers=a.workers, strict=a.strict, corpus_format=a.format,
                             progress=progress, ray=a.ray, shard_size=a.shard_size, vector_dtype=a.vector_dtype,
                             target_recall=a.target_recall, worker_kind=a.worker_kind)
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
    from umr.retrieval.indexing.pipeline import add_to_index

    eng = Engine.open(a.index_dir)
    try:
        report = add_to_index(eng.store, eng.encoder, a.corpus, batch_size=a.batch_size, workers=a.workers, strict=a.strict,
                              corpus_format=a.format, progress=not a.no_progress, worker_kind=a.worker_kind)
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
        from umr.retrieval.indexing.reencode_check import reencode_check

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
    from umr.index import recall_tuning
    from umr.index.store import IndexStore

    store = IndexStore.open(a.index_dir)
    try:
        found = recall_tuning.tune_store(store, a.target_recall, k=a.k)
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


def add_index_commands(sub) -> None:
    """`umr index ...`: build and maintain indexes."""
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
    ingest_flags(b)
    b.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="encode on a Ray cluster: auto (the one on this machine, else a local one) or a head "
                        "node's address; needs umr[distributed]")
    b.add_argument("--shard-size", type=positive_int, default=4096,
                   help="records per shard of a --ray build (the unit a rerun resumes by)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_index_build, forwards=lambda a: not a.vectors)  # precomputed vectors: no encoder runs
    ad = ix.add_parser("add", help="add a corpus to an index without rebuilding it")
    ad.add_argument("index_dir")
    ad.add_argument("corpus")
    ingest_flags(ad)
    ad.set_defaults(fn=cmd_index_add)
    de = ix.add_parser("delete", help="delete documents by id")
    de.add_argument("index_dir")
    de.add_argument("ids", nargs="+")
    de.set_defaults(fn=cmd_index_delete, forwards=False)
    inf = ix.add_parser("info", help="what an index holds and how it was built")
    inf.add_argument("index_dir")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(fn=cmd_index_info, forwards=False)
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
    ve.set_defaults(fn=cmd_index_verify, forwards=False)
    co = ix.add_parser("compact", help="drop dead rows left by deleted and replaced documents, rebuild their FAISS")
    co.add_argument("index_dir")
    co.set_defaults(fn=cmd_index_compact, forwards=False)
    tu = ix.add_parser("tune", help="pick search parameters (nprobe, refine, efSearch) for a recall target, measured on "
                                    "the index's own vectors; every process that opens the index then uses them")
    tu.add_argument("index_dir")
    tu.add_argument("--target-recall", type=float, required=True, metavar="R", help="e.g. 0.95")
    tu.add_argument("--k", type=positive_int, default=10, help="recall@k (default 10)")
    tu.add_argument("--json", action="store_true")
    tu.set_defaults(fn=cmd_index_tune, forwards=False)
