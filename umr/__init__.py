"""umr: universal multimodal retrieval. The `umr` command lives in umr.cli."""
__version__ = "0.1.0"
