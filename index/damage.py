"""Reads that meet damage: a damaged page, or a row umr never wrote, raised as IndexDamaged.

The CLI prints such an error as one line and the server answers 500 `index_damaged`: the
store's fault, never the caller's, so no client takes it for its own mistake.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sqlite3

from umr.index.errors import IndexDamaged, UmrError

CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


def is_damage(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite failed because the file is damaged (not busy, locked or misused); text
    that is not UTF-8 any more is damage too (umr only ever stores valid UTF-8)."""
    return getattr(e, "sqlite_errorname", "") in CORRUPT or "malformed" in str(e) or "Could not decode" in str(e)


def damage_as_error(method):
    """A read that meets a damaged page or a row umr never wrote raises IndexDamaged, which the
    CLI prints as one line and the server answers 500: the store's fault, never the caller's."""
    @contextlib.contextmanager
    def translated(store):
        try:
            yield
        except UmrError:
            raise
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            raise IndexDamaged(f"{store.path} is damaged ({e}); run `umr index verify` on the index") from None
        except (ValueError, KeyError) as e:  # undecodable metadata, a vector of the wrong size, a missing row
            raise IndexDamaged(f"{store.path} holds a row it cannot decode ({e.__class__.__name__}: "
                               f"{str(e)[:80]}); run `umr index verify` on the index") from None

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self, *args, **kwargs):
            with translated(self):
                yield from method(self, *args, **kwargs)
        return generator

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with translated(self):
            return method(self, *args, **kwargs)
    return wrapped
