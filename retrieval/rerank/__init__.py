"""Re-ranking a search's top candidates with a cross-encoder (lit-cross, or an MLLM answering Yes/No)."""
