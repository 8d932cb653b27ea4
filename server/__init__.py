"""Service layer: the FastAPI app over an Engine, with micro-batching, limits and metrics."""
