"""Storage layer: FAISS vector indexes, the document store and the self-describing index directory.

Knows numpy, faiss and sqlite, and torch only for exact search's matrix product (vector_index.exact_topk,
device_flat), imported when first called; never the encoders. Its names load on first use, so
that reading umr.index.errors (the CLI does, to parse its arguments) loads no FAISS.
"""
__all__ = ["IndexStore", "SearchHit", "IndexError_", "IndexMismatch", "NotFound"]


def __getattr__(name: str):
    if name in ("IndexStore", "SearchHit"):
        from umr.index import store

        return getattr(store, name)
    if name in __all__:
        from umr.index import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'umr.index' has no attribute {name!r}")
