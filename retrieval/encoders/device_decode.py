"""JPEGs decoded and resized on the encoder's device (`--image-decode device`).

On a GPU build the CPU threads that decode and resize are what the GPU waits for (issue 25's
profile: PIL's resize took half of every batch). Here a preparation worker only reads the file and
its header, checks every limit (retrieval/images.py), and passes the bytes on; the whole
batch is then decoded by torchvision's `decode_jpeg` on the device (nvJPEG on CUDA) and resized
there with the same kernel the CPU path uses (towers.resize_crop).

Only what the device decoder reads exactly as the CPU path would goes this way: baseline or
progressive JPEGs in RGB or grey, upright (no EXIF turn), within the crop aspect, complete
(ending in an EOI marker). Everything else takes the CPU path in the worker, so odd files keep
their CPU treatment and a truncated file is still rejected before anything is stored.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from umr.index.errors import InvalidArgument
from umr.retrieval.images import EXIF_ORIENTATION, ImageLimits, open_unloaded


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, checked and waiting for the device decoder."""

    data: bytes
    label: str  # what an error names


def for_device(source, limits: ImageLimits) -> EncodedJpeg | None:
    """`source` (path or bytes) as an EncodedJpeg, or None when it must take the CPU path.
    Raises BadImage where the CPU path would (missing, over a limit, not an image)."""
    if not isinstance(source, (str, Path, bytes, bytearray)):
        return None
    img = open_unloaded(source, limits)  # every limit, from the header alone
    try:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        if img.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
            return None
        w, h = img.size
        if max(w, h) > limits.crop_aspect * min(w, h):
            return None
    except Exception:  # noqa: BLE001 - an unreadable header part: the CPU path decides
        return None
    finally:
        img.close()
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return None  # truncated (or trailing data): PIL's verdict, not the device's
    return EncodedJpeg(data, "image bytes" if isinstance(source, (bytes, bytearray)) else str(source))


# torchvision 0.29 marks its image I/O deprecated in favour of TorchCodec, on every call; it
# still works, and the GPU machines' torchvision predates the notice. A filter set once, not
# catch_warnings per call: that swaps the process's filters and is not safe across threads.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _decoder():
    from torchvision.io import ImageReadMode, decode_jpeg

    return ImageReadMode, decode_jpeg


def image_batch(images: list, device: torch.device, resize_crop: Callable[[torch.Tensor], torch.Tensor],
                cpu_fallback: Callable[[EncodedJpeg], torch.Tensor]) -> torch.Tensor:
    """One uint8 (B, C, S, S) batch on `device` from preprocessed tensors and EncodedJpegs, in
    order. A JPEG the device decoder refuses after all is decoded on the CPU path instead."""
    ImageReadMode, decode_jpeg = _decoder()

    jpeg_at = [i for i, x in enumerate(images) if isinstance(x, EncodedJpeg)]
    out: list[torch.Tensor | None] = [None if isinstance(x, EncodedJpeg) else x.to(device) for x in images]
    if jpeg_at:
        raw = [torch.frombuffer(bytearray(images[i].data), dtype=torch.uint8) for i in jpeg_at]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the batch: find it one by one
            decoded = [_one(r, device) for r in raw]
        for i, pixels in zip(jpeg_at, decoded):
            out[i] = resize_crop(pixels) if pixels is not None else cpu_fallback(images[i]).to(device)
    return torch.stack(out)


def _one(raw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    ImageReadMode, decode_jpeg = _decoder()

    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def decode_on_cpu(image: EncodedJpeg, preprocess: Callable[[Image.Image], torch.Tensor],
                  limits: ImageLimits) -> torch.Tensor:
    """The CPU path for a JPEG the device would not decode."""
    from umr.retrieval.images import BadImage, open_image

    try:
        return preprocess(open_image(image.data, limits))
    except BadImage as e:
        raise InvalidArgument(f"image {image.label}: {e}") from None
