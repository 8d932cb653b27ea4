"""Encoders: spec strings resolve to objects with `encode(items, role)`, `dim` and `fingerprint`."""
from umr.retrieval.encoders.base import Encoder, EncoderError
from umr.retrieval.encoders.registry import load_encoder, load_recorded

__all__ = ["Encoder", "EncoderError", "load_encoder", "load_recorded"]
