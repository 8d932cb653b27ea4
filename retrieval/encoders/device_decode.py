"""JPEGs decoded by libjpeg-turbo straight into a tensor, on the encoder's device or on this CPU.

On a GPU build the CPU threads that decode and resize are what the GPU waits for (issue 25's
profile: PIL's resize took half of every batch). With `--image-decode device` a preparation
worker only reads the file and its header, checks every limit (retrieval/images.py), and passes
the bytes on; the whole batch is then decoded by torchvision's `decode_jpeg` on the device
(nvJPEG on CUDA) and resized there with the same kernel the CPU path uses (towers.resize_crop).

On the CPU path the same decoder serves the JPEGs that PIL would decode whole (`decoded_here`):
the pixels are PIL's to the bit, without PIL's Python-level marker parsing, its loading loop
and the copy of its pixels into an array: about a fifth of a worker's time per image.

Only what the decoder reads exactly as PIL would goes this way: baseline or progressive JPEGs
in RGB or grey, upright (no EXIF turn), within the crop aspect, complete (ending in an EOI
marker). Everything else takes PIL's path, so odd files keep their treatment and a truncated
file is still rejected before anything is stored.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from umr.index.errors import InvalidArgument
from umr.retrieval.images import EXIF_ORIENTATION, ImageLimits, jpeg_draft_scale, open_unloaded


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, checked and waiting for the device decoder."""

    data: bytes
    label: str  # what an error names


def for_device(source, limits: ImageLimits) -> EncodedJpeg | None:
    """`source` (path or bytes) as an EncodedJpeg, or None when it must take the CPU path.
    Raises BadImage where the CPU path would (missing, over a limit, not an image)."""
    found = _plain_jpeg(source, limits)
    return found[0] if found is not None else None


def decoded_here(source, limits: ImageLimits, min_side: int,
                 resize_crop: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """`source` decoded on this CPU and preprocessed by `resize_crop`, where PIL would decode
    every pixel of it (not in draft mode, retrieval/images.py): the same tensor as the PIL path
    to the bit (tests/test_numerics.py). None where PIL must decode it; raises BadImage as
    `for_device` does."""
    if not decoders_agree():  # before any header is read: every image then goes to PIL
        return None
    found = _plain_jpeg(source, limits)
    if found is None or jpeg_draft_scale(*found[1], min_side):
        return None
    pixels = _one(_stream(found[0].data), CPU)  # None: a stream libjpeg stops on, PIL's verdict as for any odd file
    return resize_crop(pixels) if pixels is not None else None


CPU = torch.device("cpu")


@functools.cache
def decoders_agree() -> bool:
    """Whether torchvision's libjpeg decodes as PIL's does in this process. Each bundles its own
    build of the library, so this is checked, once, on a photo-like JPEG made here (chroma at
    half resolution, as cameras and PIL write it, and grey); where they differ, every JPEG takes
    PIL's path and the vectors stay what they were, as they do where torchvision cannot decode
    JPEGs at all."""
    import numpy as np

    try:
        _decoder()
    except Exception:  # noqa: BLE001 - no image support in this torchvision: PIL decodes
        return False
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 40, (48, 64, 3))
    photo = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    for img in (photo, photo.convert("L")):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        ours = _one(_stream(buf.getvalue()), CPU)  # None: built without libjpeg
        theirs = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        if ours is None or not np.array_equal(ours.permute(1, 2, 0).numpy(), theirs):
            return False
    return True


def _plain_jpeg(source, limits: ImageLimits) -> tuple[EncodedJpeg, tuple[int, int]] | None:
    """`source` as an EncodedJpeg with its width and height, where libjpeg decodes it as PIL does."""
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
    return EncodedJpeg(data, "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)), (w, h)


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
        raw = [_stream(images[i].data) for i in jpeg_at]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the batch: find it one by one
            decoded = [_one(r, device) for r in raw]
        for i, pixels in zip(jpeg_at, decoded):
            out[i] = resize_crop(pixels) if pixels is not None else cpu_fallback(images[i]).to(device)
    return torch.stack(out)


def _stream(data: bytes) -> torch.Tensor:
    """A JPEG's bytes as the uint8 tensor decode_jpeg reads (a writable copy: torch refuses
    to wrap read-only bytes without a warning)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _one(raw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One stream decoded to RGB on `device`, or None where libjpeg (or nvJPEG) refuses it."""
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
