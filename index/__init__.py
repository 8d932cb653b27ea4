"""Storage layer: FAISS vector indexes, the document store and the self-describing index directory.

Knows numpy, faiss and sqlite, and torch only for exact search's matrix product (vector_index.exact_topk,
device_flat), imported when first called; never the encoders.
"""
from umr.index.errors import IndexError_, IndexMismatch, NotFound
from umr.index.store import IndexStore, SearchHit

__all__ = ["IndexStore", "SearchHit", "IndexError_", "IndexMismatch", "NotFound"]
