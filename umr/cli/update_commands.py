"""`umr update`: a new encoder in front of an index, without re-indexing it."""
from __future__ import annotations

import json
import sys

from umr.cli.args import UserError, positive_int
from umr.retrieval.update import compensators
def cmd_update(a) -> int:
    from umr.index.store import IndexStore
    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.update.fit import describe_interval, fit_update, registered_encoder

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


def add_update_command(sub) -> None:
    """`umr update`."""
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
