"""Storage layer: FAISS vector indexes, the document store and the self-describing index directory.

Knows numpy, faiss and sqlite only; nothing here imports torch or the encoders.
"""
from index.errors import IndexError_, IndexMismatch, NotFound
from index.store import IndexStore, SearchHit

__all__ = ["IndexStore", "SearchHit", "IndexError_", "IndexMismatch", "NotFound"]
