"""Reading watched images for the scheduler: bytes in once, fingerprinted, hashed, decoded safely."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from phicapd.config import ImagingSettings
from phicapd.errors import ImageError
from phicapd.imaging import decode_image, decode_read, read_file
from phicapd.pipeline.journal import Fingerprint


@dataclass(frozen=True, slots=True)
class Decoded:
    """An image read from disk, ready for the model."""

    image: Image.Image
    sha256: str
    fingerprint: Fingerprint


DecodeFile = Callable[[Path], Decoded]
DecodeBytes = Callable[[bytes, str], Image.Image]

# A file this young that looks cut off may still be being written: retry it instead of failing it.
YOUNG_SECONDS = 30.0


def read_image_file(path: Path, settings: ImagingSettings) -> Decoded:
    data, st = read_file(path, settings.max_file_bytes)
    image = decode_read(data, path, st.st_mtime, settings, min_age_seconds=YOUNG_SECONDS)
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


def fingerprint_of(path: Path) -> Fingerprint | None:
    """The image's fingerprint now, or None if it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)
