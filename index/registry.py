"""The encoder-version registry inside a manifest: versions by number and fingerprint, and the
compensators each segment keeps per query encoder version.

Two processes may register at once (`umr update --no-activate` beside a running server), so
registrations are merged, never overwritten: `merge` copies what one manifest registered into
another, under the manifest lock (index/locks.py).
"""
from __future__ import annotations

from umr.index.errors import IndexError_
from umr.index.manifest import now


def version(manifest: dict, v: int, where) -> dict:
    for rec in manifest["encoders"]:
        if rec["version"] == v:
            return rec
    raise IndexError_(f"no encoder version {v} in {where}")


def version_of_fingerprint(manifest: dict, fingerprint: str) -> int | None:
    for rec in manifest["encoders"]:
        if rec["fingerprint"] == fingerprint:
            return rec["version"]
    return None


def register(manifest: dict, encoder: dict) -> int:
    """Record an encoder version (not yet active), or find it by fingerprint; its number."""
    known = version_of_fingerprint(manifest, encoder["fingerprint"])
    if known is not None:
        return known
    v = max(r["version"] for r in manifest["encoders"]) + 1
    manifest["encoders"].append({**encoder, "version": v, "registered": now()})
    return v


def set_compensator(segment_record: dict, from_version: int, modality: str, record: dict) -> None:
    segment_record.setdefault("compensators", {}).setdefault(str(from_version), {})[modality] = record


def set_reference(manifest: dict, v: int, record: dict, where) -> None:
    version(manifest, v, where)["reference"] = record


def merge(into: dict, source: dict, prefer_source: bool, history: bool = False) -> None:
    """Copy into `into` the encoder versions and compensators `source` registered (and its
    history events, with `history`). Where both hold a compensator for the same segment,
    version and modality, `prefer_source` says whose is kept."""
    known = {r["fingerprint"] for r in into.setdefault("encoders", [])}
    into["encoders"].extend(r for r in source.get("encoders", []) if r["fingerprint"] not in known)
    segments = {rec["id"]: rec for rec in into.get("segments", [])}
    for rec in source.get("segments", []):
        target = segments.get(rec["id"])
        if target is None:
            continue
        for v, by_mod in rec.get("compensators", {}).items():
            mine = target.setdefault("compensators", {}).setdefault(v, {})
            for modality, comp in by_mod.items():
                if prefer_source or modality not in mine:
                    mine[modality] = comp
    if history:
        events = into.setdefault("history", [])
        events.extend(e for e in source.get("history", []) if e not in events)
