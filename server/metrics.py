"""Prometheus metrics: requests and latency by endpoint, encode and search time, batch sizes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("umr_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("umr_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.encode = Histogram("umr_encode_seconds", "Encoder forward time per batch", buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.search = Histogram("umr_search_seconds", "Index search time per batch", buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.batch_size = Histogram("umr_batch_size", "Queries per encoder forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
