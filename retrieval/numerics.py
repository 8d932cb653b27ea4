"""Options that trade the last digits of the vectors for speed on a device.

`--precision float16` runs the towers' forward passes under autocast; `--image-decode device`
decodes JPEGs and resizes them on the encoder's device (retrieval/encoders/device_decode.py) instead of
in CPU threads. Both change the vectors slightly, so an index records which were in force
(`Encoder.record()["numerics"]`, folded into its `vectors_fingerprint`): a build resumes only
with the same ones, and the feature cache keeps their features apart. Queries may be embedded
either way: every option here stays within cosine 0.999 of the float32 CPU path (measured on
lit-base over 128 flickr8k images: float16 min 0.99978; tests/test_numerics.py keeps it so).

bfloat16 is not offered: its 8-bit mantissa put lit-base's image vectors at min cosine 0.9967
(mean 0.9992) in the same measurement, outside that bound; on tensor-core GPUs float16 runs
as fast.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from umr.index.errors import InvalidArgument

PRECISIONS = ("float32", "float16")
IMAGE_DECODES = ("cpu", "device")


@dataclass(frozen=True)
class Numerics:
    precision: str = "float32"
    image_decode: str = "cpu"

    def record(self) -> dict:
        """What differs from the float32 CPU path (empty when nothing does)."""
        return {k: v for k, v in (("precision", self.precision), ("image_decode", self.image_decode))
                if v != getattr(Numerics, k)}

    def cache_tag(self) -> str:
        """The feature cache namespace's suffix for tower features computed under these options."""
        return "-f16" if self.precision == "float16" else ""

    def autocast(self, device):
        """The context a forward pass on `device` (a torch.device) runs in."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        import torch  # not at import time: the CLI reads PRECISIONS before anything loads torch

        return torch.autocast(device.type, dtype=torch.float16)


_chosen: Numerics | None = None


def choose(precision: str | None = None, image_decode: str | None = None) -> Numerics:
    """Set the options for every forward pass from now on (default: $UMR_PRECISION and
    $UMR_IMAGE_DECODE, else float32 and cpu); returns them."""
    global _chosen
    precision = (precision or os.environ.get("UMR_PRECISION") or "float32").strip().lower()
    image_decode = (image_decode or os.environ.get("UMR_IMAGE_DECODE") or "cpu").strip().lower()
    if precision not in PRECISIONS:
        raise InvalidArgument(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}"
                              + (" (bfloat16 moves image vectors past cosine 0.999; float16 does not)"
                                 if precision == "bfloat16" else ""))
    if image_decode not in IMAGE_DECODES:
        raise InvalidArgument(f"unknown image decode {image_decode!r}: use {' or '.join(IMAGE_DECODES)}")
    _chosen = Numerics(precision, image_decode)
    return _chosen


def current() -> Numerics:
    return _chosen if _chosen is not None else choose()
