"""Replacing a live engine: with another registered encoder version, or, for a read-only
server, with a fresh one over the index its writer changed the shape of (server/follower.py).

The new engine is built beside the old one (weights and compensators loaded while the old one
keeps serving) and takes over the old one's re-ranker; only the activation itself takes the
write lock, so a write either lands before it, embedded by the old version, or after it, by
the new one.
"""
from __future__ import annotations

import logging

from umr.index.errors import IndexError_
from umr.retrieval.engine import Engine

log = logging.getLogger("umr.retrieval")


class SwapRefused(IndexError_):
    """The version cannot serve this index yet; `reason` is a short code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def engine_for_version(old: Engine, version: int) -> Engine | None:
    """A ready engine querying with `version`, or None when `old` already does."""
    store = old.store
    store.refresh_registrations()
    try:
        rec = store.version(version)
    except IndexError_:
        raise SwapRefused("unknown_version", f"encoder version {version} is not registered; "
                                             "run `umr update --no-activate` first") from None
    if version == old.version:
        return None
    from umr.retrieval.encoders import load_recorded

    new = Engine(store, load_recorded(rec))
    alive = {seg.id for seg in store.segments if seg.alive.any()}
    for seg_id, comps in new.compensators.items():
        if not comps and seg_id in alive:
            raise SwapRefused("no_compensators", f"version {version} has no compensator into segment {seg_id}; "
                                                 f"fit them with `umr update {store.path} --to {version} --no-activate` "
                                                 "(beside this server), then activate it again")
    try:
        carry_reranker(old, new)
    except ValueError as e:
        raise SwapRefused("reranker", str(e)) from None
    return new


def carry_reranker(old: Engine, new: Engine) -> None:
    """The old engine's re-ranker, depth and weight on the new one (ValueError where it cannot
    re-rank the new encoder's candidates)."""
    if old.reranker is not None:
        new.use_reranker(old.reranker, old.rerank_depth, old.rerank_weight)


def reopened(old: Engine) -> Engine:
    """A fresh read-only engine over the same index, querying with the same encoder object
    unless the writer activated another version. A document store still the file the old
    engine checked is not checked again (at 10M documents SQLite's check took about 14 s)."""
    from umr.index.store import IndexStore

    store = IndexStore.open(old.store.path, "read", checked_file=old.store.docs.checked_file)
    try:
        encoder = old.encoder
        if store.active_version != old.version:
            from umr.retrieval.encoders import load_recorded

            encoder = load_recorded(store.version(store.active_version))
        new = Engine(store, encoder)
        carry_reranker(old, new)
        return new
    except Exception:
        store.close()
        raise


def activate(old: Engine, new: Engine, publish) -> None:
    """Record `new`'s version as active and `publish` it (e.g. make it the server's engine),
    both under the old engine's write lock."""
    with old.write_lock:
        old.store.activate(new.version)
        publish(new)
    log.info("encoder version %d (%s) is active; it was %d (%s)", new.version, new.encoder.spec, old.version,
             old.encoder.spec, extra={"version": new.version})
    if old.encoder is not new.encoder:  # requests still on the old engine keep it until they finish
        from umr.retrieval.encoders.registry import release

        release(old.encoder)
