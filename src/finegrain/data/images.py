"""Image decoding with errors that name the file: the one place the data layer opens images."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


class ImageError(ValueError):
    """An image is missing or cannot be decoded; the message names the file and the reason."""


def _decode(source: str | Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()  # force the full decode here, so truncated files fail now, not in a worker later
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).replace(repr(source), "data")  # PIL names an in-memory source by its address
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {reason})") from None


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully decoded as an RGB ``PIL.Image`` (``H x W x 3``, uint8)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    return _decode(path, str(path))


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (e.g. a tar member) as RGB; ``name`` identifies them in errors."""
    if not data:
        raise ImageError(f"{name}: image data is empty")
    return _decode(io.BytesIO(data), name)
