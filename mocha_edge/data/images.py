"""Image loading that reports broken files instead of crashing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(Exception):
    """An image file is missing, empty, truncated or not an image. ``str()`` is a one-line reason."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file fully into an RGB ``uint8`` HWC array (EXIF orientation applied).

    Raises :class:`ImageReadError` with a short reason for zero-byte, truncated, corrupt or
    unsupported files. Truncated files are refused, not padded with grey.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageReadError(f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise ImageReadError("zero-byte image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # full decode: raises on truncated data
                im = ImageOps.exif_transpose(im)
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, ImportError):  # ImportError: ultralytics' HEIF hook without pi-heif
        raise ImageReadError("not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageReadError(
            f"declares more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?); refused"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower():
            msg = "truncated image file"
        raise ImageReadError(f"corrupt image ({msg})") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"image has unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, reading only the header."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"declares more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?); refused"
        ) from None
    with im:
        w, h = im.size
        try:
            orient = im.getexif().get(0x0112, 1)
        except Exception:
            orient = 1
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)
