"""umr: universal multimodal retrieval.

    import umr
    with umr.Index.build("corpus.jsonl", encoder="lit-base", out="idx") as index:
        hits = index.search(text="a dog on the beach", k=5)

The `umr` command lives in umr.cli. The library's names load on first use (umr.api), so the
command starts without importing torch for `--help`.
"""
import os as _os

__version__ = "0.1.0"

# Installed, the layers sit inside this package (umr/index, umr/retrieval, ...). In a source
# checkout they are the repository's top-level folders beside umr/ (pyproject.toml maps them),
# so a checkout on PYTHONPATH (a GPU machine with nothing installed, a baseline revision served
# side by side, a Ray worker) resolves `umr.index` from that same checkout.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "index")) and _os.path.isfile(_os.path.join(_checkout, "index", "store.py")):
    __path__.append(_checkout)
__all__ = ["Index", "Hit", "Document", "load_encoder", "EncoderHandle"]


def __getattr__(name: str):
    if name in __all__:
        from umr import api

        return getattr(api, name)
    raise AttributeError(f"module 'umr' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
