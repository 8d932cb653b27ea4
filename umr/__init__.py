"""umr: universal multimodal retrieval.

    import umr
    with umr.Index.build("corpus.jsonl", encoder="lit-base", out="idx") as index:
        hits = index.search(text="a dog on the beach", k=5)

The `umr` command lives in umr.cli. The library's names load on first use (umr.api), so the
command starts without importing torch for `--help`.
"""
__version__ = "0.1.0"
__all__ = ["Index", "Hit", "Document", "load_encoder", "EncoderHandle"]


def __getattr__(name: str):
    if name in __all__:
        from umr import api

        return getattr(api, name)
    raise AttributeError(f"module 'umr' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
