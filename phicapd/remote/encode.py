"""A decoded image -> the base64 data URL a chat-completions request carries.

The server gets what ``phicapd.imaging`` decoded safely (EXIF orientation applied, 8-bit RGB,
first frame), re-encoded here, never the bytes a hostile file came with. Images above
``max_pixels`` are scaled down first so that a request stays within the server's limits.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Literal

from PIL import Image


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` scaled down (aspect kept) to at most ``max_pixels``; itself when it fits."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_url(
    image: Image.Image, *, fmt: Literal["jpeg", "png"] = "jpeg", quality: int = 95, max_pixels: int = 1344 * 1344
) -> str:
    """``data:image/...;base64,...`` of ``image`` after ``fit_pixels``."""
    image = fit_pixels(image, max_pixels)
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: the server decodes it at once, so bytes saved by harder compression are not worth the CPU.
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
