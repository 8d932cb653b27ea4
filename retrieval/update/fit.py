"""Registering a new encoder on an index without re-embedding it: fit one compensator per
(older segment, query modality) from calibration pairs (retrieval/update/calibration_pairs.py), then
activate the new version.

Nothing is written until every check has passed: an update that would leave a query modality
refused where the index answered it before, or that retrieves worse than the old encoders on
`--eval` beyond the noise, changes nothing unless forced.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from umr.index import layout, side_files
from umr.index.errors import InvalidArgument
from umr.index.store import IndexStore, Segment
from umr.retrieval.update import compensators as cp
from umr.retrieval.update.calibration_pairs import DEFAULT_CALIBRATION, MIN_PAIRS, QUERY_MODALITIES, check_sources, segment_pairs
from umr.retrieval.encoders import Encoder, load_recorded
from umr.retrieval.update.reference_queries import write_references
from umr.retrieval.update.version_scales import fit_segment
from umr.retrieval.update.judged import describe_interval, evaluate_variants, uncovered_eval_modalities

log = logging.getLogger("umr.retrieval")

CORPUS_SAMPLE_FOR_AGREEMENT = 20_000


class UpdateRefused(InvalidArgument):
    """The update would make the index worse (a lost query modality, or worse retrieval on
    --eval beyond the noise); nothing was changed."""


def recorded_modalities(record: dict) -> set[str]:
    """What a registered version embeds; records from before `query_modalities` was kept load
    the encoder to ask, and one that no longer loads is assumed to have embedded everything
    (so the guard errs on the side of refusing)."""
    if "query_modalities" in record:
        return set(record["query_modalities"])
    try:
        return set(load_recorded(record).query_modalities)
    except Exception:  # noqa: BLE001
        return set(QUERY_MODALITIES)


def served_modalities(store: IndexStore, seg: Segment, version: int, embeds: set[str]) -> set[str]:
    """Query modalities `version` answers in `seg`: all it embeds in a segment it filled, those
    with a compensator elsewhere."""
    if seg.record["encoder"]["fingerprint"] == store.version(version)["fingerprint"]:
        return set(embeds)
    return embeds & set(seg.record.get("compensators", {}).get(str(version), {}))


def registered_encoder(store: IndexStore, version: int) -> Encoder:
    """The encoder an index recorded as `version`, for going back (or forward again) with
    `umr update --to`: refused if its weights have changed since, as compensators fitted to
    other weights would map its queries wrongly."""
    known = [v["version"] for v in store.versions]
    if version not in known:
        raise InvalidArgument(f"--to {version}: {store.path} has encoder versions {', '.join(map(str, known))}")
    if version == store.active_version:
        raise InvalidArgument(f"--to {version}: version {version} is already active")
    record = store.version(version)
    enc = load_recorded(record)
    if enc.fingerprint != record["fingerprint"]:
        raise InvalidArgument(f"--to {version}: {record['spec']} no longer loads with the weights version {version} "
                              f"was registered with (fingerprint {enc.fingerprint}, recorded {record['fingerprint']})")
    return enc


def fit_update(store: IndexStore, new: Encoder, calibration: list[str] | None = None, method: str = "auto",
               per_modality: int = 2000, activate: bool = True, seed: int = 0, eval_path: str | None = None,
               force: bool = False, reindex_sample: int | None = None, eval_new_path: str | None = None,
               eval_docs: str | None = None) -> dict:
    default = not calibration
    calibration = list(calibration or DEFAULT_CALIBRATION)
    check_sources(calibration)
    t0 = time.perf_counter()
    report = {"encoder": new.spec, "fingerprint": new.fingerprint, "calibration": calibration, "segments": []}
    fitted, pairs_of = [], {}
    for seg in list(store.segments):
        seg_version = seg.record["encoder"].get("version", 1)
        if seg.record["encoder"]["fingerprint"] == new.fingerprint or len(seg.alive) == 0:
            continue
        got = segment_pairs(store, seg, new, calibration, default, per_modality, seed)
        alive = np.flatnonzero(seg.alive)
        sample = alive if len(alive) <= CORPUS_SAMPLE_FOR_AGREEMENT else np.sort(
            np.random.default_rng(seed).choice(alive, CORPUS_SAMPLE_FOR_AGREEMENT, replace=False))
        corpus = store.docs.vectors_at(seg.id, sample)
        seg_report = {"segment": seg.id, "segment_version": seg_version, "modalities": {}, "notes": got.notes}
        for modality in QUERY_MODALITIES:
            if modality not in got.pairs:
                seg_report["modalities"][modality] = {"status": "no calibration data: these queries are refused for this segment"}
                continue
            n_vecs, o_vecs = got.stacked(modality)
            if len(n_vecs) < MIN_PAIRS:
                seg_report["modalities"][modality] = {"status": f"only {len(n_vecs)} pairs (need {MIN_PAIRS}): refused"}
                continue
            kinds = cp.KINDS if method == "auto" else (method,)
            comp, table = cp.select(n_vecs, o_vecs, corpus, kinds=kinds, seed=seed)
            fitted.append((seg, modality, comp, table, len(n_vecs)))
            pairs_of[(seg.id, modality)] = (n_vecs, o_vecs)
            seg_report["modalities"][modality] = {"status": "ok", "chosen": comp.kind, "pairs": int(len(n_vecs)),
                                                  "sources": got.sources[modality], "comparison": table}
            log.info("segment %d, %s queries: %s compensator from %d calibration pairs", seg.id, modality, comp.kind,
                     len(n_vecs), extra={"segment": seg.id})
        report["segments"].append(seg_report)
    if activate and not force:
        lost = lost_modalities(store, new, report["segments"])
        if lost:
            raise UpdateRefused(f"not activated: {lost}; add --calibration QUERIES.jsonl with such queries, "
                                "register only with --no-activate, or --force to activate without them")
    for label, path in (("--eval", eval_path), ("--eval-new", eval_new_path)):
        uncovered = uncovered_eval_modalities(path, report["segments"]) if path else ""
        if uncovered and not force:
            # Scoring those queries would compare the compensators on queries none of them can map.
            raise UpdateRefused(f"not activated: the {label} queries include {uncovered}, for which there is no "
                                "calibration data; add --calibration QUERIES.jsonl with queries of that kind, or --force")
    if eval_path:
        report["eval"] = evaluate_variants(store, new, fitted, pairs_of, eval_path, reindex_sample=reindex_sample)
        r = report["eval"]["hit_rate@5"]
        cmp = report["eval"]["chosen against old"]
        if cmp["interval95"][1] < 0 and not force:  # worse beyond what the choice of queries explains
            figures = ", ".join(f"{k} {v:.3f}" for k, v in r.items())
            raise UpdateRefused(f"not activated: with the chosen compensators hit rate@5 on {eval_path} is "
                                f"{r['chosen']:.3f}, below the old encoder's {r['old encoders']:.3f} beyond the noise "
                                f"({describe_interval(cmp)}; {figures}); use --force to register it anyway")
    if eval_new_path:
        # New-domain queries show what the update buys; they never refuse it.
        report["eval_new"] = evaluate_variants(store, new, fitted, pairs_of, eval_new_path, reindex_sample=reindex_sample)
    if eval_docs:
        from umr.retrieval.update.preview import preview

        queries = {label: path for label, path in (("old-domain", eval_path), ("new-domain", eval_new_path)) if path}
        if not queries:
            raise InvalidArgument("--eval-docs scores the --eval and --eval-new queries: give at least one of them")
        report["preview"] = preview(store, new, lambda copy: commit(copy, new, fitted, pairs_of, {"segments": []},
                                                                    calibration, method, True), eval_docs, queries)
    # What the pairs came from, which is not always what was asked (a photo library's text
    # queries fall back to the generic ones).
    report["calibration_requested"] = calibration
    report["calibration"] = sorted({src for seg in report["segments"] for r in seg["modalities"].values()
                                    for src in r.get("sources", [])})
    commit(store, new, fitted, pairs_of, report, calibration, method, activate)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("registered %s as encoder version %d (%s) in %.1f s", new.spec, report["version"],
             "active" if report["active_version"] == report["version"] else "not active", report["seconds"],
             extra={"version": report["version"]})
    return report


def lost_modalities(store: IndexStore, new: Encoder, segment_reports: list[dict]) -> str:
    """'image and image,text queries, which segment 0 answers now, would be refused there (no
    calibration data)' for every segment where the new version would refuse a query modality
    the active one answers; '' if none."""
    before_embeds = recorded_modalities(store.version(store.active_version))
    new_embeds = set(new.query_modalities)
    status = {r["segment"]: r["modalities"] for r in segment_reports}
    lost = []
    for seg in store.segments:
        if not seg.alive.any():
            continue
        before = served_modalities(store, seg, store.active_version, before_embeds)
        ok = {m for m, r in status.get(seg.id, {}).items() if r["status"] == "ok"}
        after = new_embeds if seg.record["encoder"]["fingerprint"] == new.fingerprint else new_embeds & ok
        gone = [m for m in QUERY_MODALITIES if m in before - after]
        if gone:
            why = {status.get(seg.id, {}).get(m, {}).get("status", f"{new.spec} does not embed them").split(":")[0]
                   for m in gone}
            lost.append(f"{_and(gone)} queries, which segment {seg.id} answers now, would be refused there "
                        f"({'; '.join(sorted(why))})")
    return "; ".join(lost)


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def commit(store: IndexStore, new: Encoder, fitted: list, pairs_of: dict, report: dict, calibration: list[str],
           method: str, activate: bool) -> None:
    """Register the version, save its compensators and reference queries, record the event, activate."""
    version = store.register_version(new.record())
    report["version"] = version
    calibration_queries: dict[str, list] = {}
    for (_, modality), (new_side, _) in pairs_of.items():
        calibration_queries.setdefault(modality, []).append(new_side)
    references = write_references(store, version, new, calibration_queries)
    scales = {seg.id: fit_segment(store, seg, new, {m: c for s, m, c, _, _ in fitted if s.id == seg.id}, references)
              for seg in {s.id: s for s, *_ in fitted}.values()}
    for seg, modality, comp, table, n in fitted:
        name, rel = layout.compensator_name(version, modality), layout.compensator_dir(seg.id)
        files = comp.save(store.path / rel, name)
        store.set_compensator(seg.id, version, modality, {
            "kind": comp.kind, "dir": rel, "name": name, "files": files, "pairs": int(n),
            "checksums": side_files.checksums(store.path / rel, files.values()),
            "scales": scales[seg.id].get(modality, {}),
            "comparison": table, "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    store.record_event("update", version=version, fingerprint=new.fingerprint, calibration=calibration,
                       method=method, report=report["segments"], eval=report.get("eval"))
    if activate:
        store.activate(version)
    else:  # registration only: allowed beside a running server, which holds the write lock
        store.save_registrations()
    report["active_version"] = store.active_version
