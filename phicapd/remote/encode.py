"""A decoded image -> the base64 data URL a chat-completions request carries.

The server gets what ``phicapd.imaging`` decoded safely (EXIF orientation applied, 8-bit RGB,
first frame), re-encoded here, never the bytes a hostile file came with.

Sent as the model will see it: made smaller exactly as Phi-3-vision's HD transform makes it
smaller for ``num_crops`` (``hd_resized``; phi3v.md §3, steps 2.1-2.5, not padded), so the
server's own transform finds it at its size already and resizes nothing, and PNG, lossless (the default), so
the server sees the very pixels phicapd's native engine sees: the same captions, and at most
``num_crops`` x 336² pixels on the wire. JPEG is a smaller request with slightly other pixels
(captions may differ in their wording). ``max_pixels`` is a last cap for a server's limits.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Literal

from PIL import Image

CROP = 336  # the vision tower's side: the HD transform resizes to a whole number of these across


def hd_resized(image: Image.Image, num_crops: int) -> Image.Image:
    """``image`` made smaller as the HD transform makes it smaller for ``num_crops``; itself when
    the transform would enlarge it (the server does that, as the native engine does, from the
    very same pixels) or keep its size.

    The same arithmetic and resampling as ``phicapd.model.processing.hd_transform`` (kept here
    so the remote backend never imports torch; a test holds the two together): a portrait is
    handled as the transposed landscape, the width becomes the largest multiple of 336 whose tile
    grid fits ``num_crops``, the height follows the aspect ratio, bilinear with PIL's antialias.
    """
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_w = (scale - 1) * CROP
    size = (new_w, max(1, int(new_w / ratio)))
    if size[0] * size[1] < image.width * image.height:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` scaled down (aspect kept) to at most ``max_pixels``; itself when it fits."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_url(
    image: Image.Image,
    *,
    fmt: Literal["jpeg", "png"] = "png",
    quality: int = 95,
    max_pixels: int = 1344 * 1344,
    num_crops: int | None = None,
) -> str:
    """``data:image/...;base64,...`` of ``image``, ``hd_resized`` for ``num_crops`` (when given),
    then within ``max_pixels``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if num_crops is not None:
        image = hd_resized(image, num_crops)
    image = fit_pixels(image, max_pixels)
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: the server decodes it at once, so bytes saved by harder compression are not worth the CPU.
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
