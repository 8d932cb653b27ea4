"""Decoding untrusted images with hard limits, fast where the format allows."""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from umr.index.errors import InvalidArgument


EXIF_ORIENTATION = 0x0112


class BadImage(InvalidArgument):
    """The image is missing, unreadable, or over a limit; the message says which, `code` names it."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Longer side over shorter side. Beyond `max_aspect` an image is refused; beyond
    # `crop_aspect` its centre is cut out to that shape before any resizing, since resizing a
    # 1 x 12,000 strip by its shorter side would make a 224 x 2,688,000 one. CLIP-style towers
    # take the centre square anyway, so what they see does not change.
    max_aspect: float = 100.0
    crop_aspect: float = 4.0


DEFAULT_LIMITS = ImageLimits()


def open_image(source, limits: ImageLimits = DEFAULT_LIMITS, min_side: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) to RGB.

    Pixels are checked from the header before any decoding, so a decompression bomb costs
    nothing. With `min_side`, JPEG decoding is scaled down in the DCT (PIL draft mode) to the
    smallest size whose sides are still >= min_side: several times faster than a full decode,
    at a cosine of 0.997-0.99998 to the fully decoded embedding; UMR_JPEG_DRAFT=0 turns it off.
    """
    img = open_unloaded(source, limits)
    w, h = img.size
    try:
        scale = jpeg_draft_scale(w, h, min_side) if img.format == "JPEG" else 0.0
        if scale:
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        img = centre_crop_to_aspect(upright(img), limits.crop_aspect)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"image is truncated or corrupt ({e.__class__.__name__})") from None


def jpeg_draft_scale(w: int, h: int, min_side: int | None) -> float:
    """How much `open_image` scales a w x h JPEG down while decoding it (draft mode), or 0 where
    it decodes every pixel: draft mode pays off from half the size on."""
    if not min_side or os.environ.get("UMR_JPEG_DRAFT", "1") == "0":
        return 0.0
    scale = min(w, h) / min_side
    return scale if scale >= 2 else 0.0


def open_unloaded(source, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """`source` opened with only its header read, every limit checked: what may be decoded."""
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if len(source) > limits.max_bytes:
                raise BadImage(f"image is {len(source)} bytes, over the limit of {limits.max_bytes}", "limit_image_bytes")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            try:
                size = path.stat().st_size
            except OSError:
                raise BadImage(f"image file not found: {path}") from None
            if size > limits.max_bytes:
                raise BadImage(f"image file is {size} bytes, over the limit of {limits.max_bytes}", "limit_image_bytes")
            fp = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
        except Image.DecompressionBombError:
            raise BadImage(f"image has too many pixels (limit {limits.max_pixels})", "limit_image_pixels") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise BadImage("not a readable image (unknown or corrupt format)") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise BadImage(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}", "limit_image_pixels")
    if w == 0 or h == 0:
        raise BadImage("image has no pixels")
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        raise BadImage(f"image is {w}x{h}, an aspect ratio of {aspect:.0f}:1, over the limit of {limits.max_aspect:g}:1",
                       "limit_image_aspect")
    return img


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: cameras store a turned photo's pixels as taken and say
    how to turn them in the EXIF Orientation tag (a phone's portrait photo is stored sideways)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image on a white page.

    PIL's plain convert("RGB") clips 16- and 32-bit grey to 255 (a 16-bit PNG became near-white)
    and drops transparency, leaving whatever colour transparent pixels happen to hold (often
    black): grey is rescaled to 8 bits and transparency composited over white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        brightest = float(grey.max())
        if img.mode.startswith("I;16") or 255 < brightest <= 65535:
            top = 65535.0  # 16-bit samples (PIL opens some 16-bit PNGs as "I")
        elif img.mode == "F" and brightest <= 1.0:
            top = 1.0  # floats in 0..1
        else:
            top = max(255.0, brightest)
        img = Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def centre_crop_to_aspect(img: Image.Image, aspect: float) -> Image.Image:
    """The centre of `img` with its longer side cut to at most `aspect` times the shorter."""
    w, h = img.size
    if max(w, h) <= aspect * min(w, h):
        return img
    if w > h:
        nw = max(1, int(h * aspect))
        left = (w - nw) // 2
        return img.crop((left, 0, left + nw, h))
    nh = max(1, int(w * aspect))
    top = (h - nh) // 2
    return img.crop((0, top, w, top + nh))
