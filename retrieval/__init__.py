"""Core layer: items, corpus readers, encoders, the indexing pipeline, the engine and evaluation."""
