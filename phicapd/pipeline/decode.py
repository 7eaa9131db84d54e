"""Reading watched images for the scheduler: bytes in once, fingerprinted, hashed, decoded safely."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

from PIL import Image

from phicapd.config import ImagingSettings
from phicapd.errors import ImageError
from phicapd.imaging import decode_image
from phicapd.pipeline.jobs import Fingerprint
from phicapd.pipeline.scheduler import DecodeBytes, Decoded, DecodeFile

# A truncated file this young may still be being written: retry it later instead of failing it.
YOUNG_SECONDS = 30.0


def read_image_file(path: Path, settings: ImagingSettings) -> Decoded:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: the file disappeared", code="image_missing") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open: {e.strerror}", code="image_unreadable") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: not a regular file", code="image_unreadable")
        if st.st_size > settings.max_file_bytes:
            raise ImageError(
                f"{path}: {st.st_size} bytes is over the {settings.max_file_bytes}-byte limit", code="image_too_large"
            )
        data = fh.read(settings.max_file_bytes + 1)
    if len(data) > settings.max_file_bytes:
        raise ImageError(f"{path}: grew past the {settings.max_file_bytes}-byte limit", code="image_too_large")
    young = st.st_mtime > time.time() - YOUNG_SECONDS
    try:
        image = decode_image(data, name=str(path), settings=settings)
    except ImageError as e:
        if young and e.code in ("image_truncated", "image_empty"):
            raise ImageError(
                f"{path}: incomplete, probably still being written ({e})", code="image_incomplete", retryable=True
            ) from None
        raise
    return Decoded(image, hashlib.sha256(data).hexdigest(), Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino))


def make_decoders(settings: ImagingSettings) -> tuple[DecodeFile, DecodeBytes]:
    def decode_file(path: Path) -> Decoded:
        return read_image_file(path, settings)

    def decode_bytes(data: bytes, name: str) -> Image.Image:
        if len(data) > settings.max_file_bytes:
            raise ImageError(
                f"{name}: {len(data)} bytes is over the {settings.max_file_bytes}-byte limit", code="image_too_large"
            )
        return decode_image(data, name=name, settings=settings)

    return decode_file, decode_bytes
