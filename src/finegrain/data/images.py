"""Image decoding with errors that name the file: the one place the data layer opens images.

Every image is returned as it is *displayed*: EXIF orientation applied (``ImageOps.exif_transpose``),
so a record's ``width``/``height`` and boxes refer to the rotated image, and converted to 8-bit RGB:

- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): divided by 257;
- 32-bit integer grey ``I``: values within ``[0, 255]`` kept; within ``[0, 65535]`` divided by 257 (16-bit
  data, as older Pillow opens 16-bit PNGs); any other range (32-bit data, negative values) scaled by its real
  range, as float is. Scaling by the 32-bit type's range would leave such images black, and clipping (as
  Pillow's own conversion does) white;
- float ``F``: values in ``[0, 1]`` times 255, any other range scaled from ``[min(0, lowest), highest]`` to
  ``[0, 255]`` (NaN counts as 0, infinities as the lowest / highest finite value);
- with transparency (``RGBA``, ``RGBa``, ``LA``, ``PA``, ``P`` or any mode with a transparent colour):
  composited on **white**;
- every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) by Pillow's conversion;
  a mode Pillow cannot convert (e.g. ``La``) raises :class:`ImageError` naming the file and the mode.

An image larger than ``PIL.Image.MAX_IMAGE_PIXELS`` is decoded with a warning naming the file (Pillow's own
warning, which names none, is silenced); one over twice that is refused, as Pillow does.

JPEGs may be decoded at a reduced size (``draft_size``); the displayed size of the file is then kept
in ``image.info["original_size"]`` and :func:`original_size` returns it.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from ..errors import DataError

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module="PIL.Image")  # _decode names it

ORIENTATION = 0x0112  # the EXIF orientation tag
SIDEWAYS = (5, 6, 7, 8)  # orientations that swap width and height
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# What Pillow's plugins raise on a bad file (truncated data, broken EXIF or headers, bombs)
DECODE_FAILURES = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError,
                   struct.error, Image.DecompressionBombError)


class ImageError(DataError):
    """An image is missing or cannot be decoded; the message names the file and the reason."""


def original_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the displayed file an image from :func:`load_image` was decoded from: larger
    than ``image.size`` when a JPEG was decoded at reduced size (``draft_size``), else ``image.size``."""
    return image.info.get("original_size", image.size)


def _grey(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")


def _grey_levels(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float grey ``pixels`` as 8-bit levels (as the module docstring says)."""
    finite = pixels[np.isfinite(pixels)]
    low, high = finite.min(initial=0.0), finite.max(initial=0.0)  # low <= 0 <= high
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and low == 0 and 255 < high <= 65535):
        return pixels / 257
    if low == 0 and high <= (1 if mode == "F" else 255):
        return pixels * (255 if mode == "F" else 1)
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=high, neginf=low)
    return (pixels - low) * (255 / (high - low))


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit ``RGB`` (``H x W x 3``) as the module docstring
    says; raise :class:`ImageError` naming ``name`` and the mode when Pillow cannot convert it."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        levels = _grey_levels(np.asarray(image).astype(np.float64), mode)
        return _grey(np.clip(np.rint(np.nan_to_num(levels)), 0, 255))
    try:
        if mode in ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from None


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(ORIENTATION, 1)


def _decode(source: str | Path | io.BytesIO, name: str, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        with Image.open(source) as image:
            stored_size = image.size
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                log.warning("%s: %dx%d pixels, more than PIL.Image.MAX_IMAGE_PIXELS=%d (a decompression bomb?); "
                            "decoding it all the same", name, image.width, image.height, Image.MAX_IMAGE_PIXELS)
            if draft_size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                # the decoder may scale by 1/2, 1/4 or 1/8 while both sides stay >= draft_size
                height, width = draft_size
                if _orientation(image) in SIDEWAYS:  # the stored width is the displayed height
                    width, height = height, width
                image.draft("RGB", (max(1, int(width)), max(1, int(height))))
            image.load()  # force the full decode here, so truncated files fail now, not in a worker later
            scaled = image.size != stored_size
            sideways = _orientation(image) in SIDEWAYS
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image, name)
    except ImageError:
        raise
    except DECODE_FAILURES as e:
        reason = str(e).replace(repr(source), "data")  # PIL names an in-memory source by its address
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {reason})") from None
    if scaled:
        rgb.info["original_size"] = stored_size[::-1] if sideways else stored_size
    return rgb


def load_image(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image file fully decoded as a displayed (EXIF-oriented) RGB ``PIL.Image`` (``H x W x 3``,
    uint8). With ``draft_size`` ``(H, W)``, a JPEG may come back smaller, but not below ``draft_size``
    unless the file itself is smaller; :func:`original_size` gives the file's displayed size."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    return _decode(path, str(path), draft_size)


def load_image_bytes(data: bytes, name: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image bytes (e.g. a tar member) as :func:`load_image` does; ``name`` identifies them
    in errors."""
    if not data:
        raise ImageError(f"{name}: image data is empty")
    return _decode(io.BytesIO(data), name, draft_size)
