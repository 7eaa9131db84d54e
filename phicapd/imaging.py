"""Safe image decoding: every image (watched, sent or downloaded) becomes 8-bit RGB here or fails
with a stable code.

What "safe" means here:

- Size caps: the encoded bytes (``ImagingSettings.max_file_bytes``) and the pixel count
  (``ImagingSettings.max_pixels``, checked from the header before any pixel buffer exists). The
  setting is the limit, above or below Pillow's default: Pillow's own guard is set to it for the
  length of each decode (``_pillow_limit``), and a refusal quotes it.
- A format allow-list passed to ``Image.open(formats=...)``: JPEG (and its MPO variant), PNG,
  WEBP, GIF, BMP, TIFF, plus AVIF when Pillow has it and HEIF when pillow-heif is installed.
  Plugins outside the list never see the bytes, so EPS/PS/PDF never reach Ghostscript.
- Pillow's decompression-bomb warning is an error (see ``_escalate_bomb_warnings``).
- A full ``load()``, so truncated files fail instead of yielding grey half-images.
- EXIF orientation applied; the first frame of animations; every mode mapped to RGB correctly
  (16-bit and float scaled rather than clipped, alpha composited on white).
- Camera raw files (named by their extension: ``image_types.RAW_EXTENSIONS``; many are TIFF
  inside, which Pillow would open as their first thumbnail) go to LibRaw (``raw_decode``): their
  largest embedded preview or a half-size development, upright, under the same limits and codes.

Error codes (``ImageError.code``):

=========================== =============================================================== =========
code                        meaning                                                         retryable
=========================== =============================================================== =========
``image_unreadable``        the file could not be opened/read, or is not a regular file     no
``image_missing``           the file no longer exists                                       no
``image_empty``             zero bytes                                                      no
``image_too_large``         more bytes than ``max_file_bytes``                              no
``image_format_unsupported`` not an image in an allowed format (text, EPS, PDF, SVG, ...)   no
``image_bomb``              more pixels than ``max_pixels`` (from the header, or Pillow's   no
                            guard inside a plugin, set to the same limit)
``image_truncated``         the data ends before the image does                             no
``image_corrupt``           recognised but undecodable data                                 no
``image_incomplete``        failed like a partial write while the file is still young       yes
=========================== =============================================================== =========
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ExifTags, Image, features

from phicapd.errors import ImageError
from phicapd.image_types import is_raw_name

if TYPE_CHECKING:  # not imported at run time: the decode workers start without pydantic
    from phicapd.config import ImagingSettings

_BASE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# The JPEG opener hands back a multi-picture JPEG as format "MPO"; we keep its first image.
_RESULT_ALIASES = ("MPO",)

# Leading bytes of formats we refuse on purpose, only to make the error message useful.
_REFUSED_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)

# Failures a file that is still being written can produce; worth retrying while it is young.
_PARTIAL_WRITE_CODES = frozenset({"image_empty", "image_truncated", "image_corrupt"})
# Shorter than any format's signature: unrecognisable only because the writer is not done yet.
_SHORTER_THAN_A_HEADER = 64

_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


def _optional_formats() -> tuple[str, ...]:
    extra: list[str] = []
    if features.check("avif"):
        extra.append("AVIF")
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return tuple(extra)
    pillow_heif.register_heif_opener()
    extra.append("HEIF")
    return tuple(extra)


ALLOWED_FORMATS: tuple[str, ...] = _BASE_FORMATS + _optional_formats()

_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def _escalate_bomb_warnings() -> None:
    """Make Pillow's DecompressionBombWarning raise, without a per-call ``catch_warnings``.

    ``warnings.catch_warnings`` swaps the process-wide filter list and is not thread-safe before
    Python 3.14, so the decode pool cannot use it. Instead one "error" filter for this single
    category is kept in the list: adding it is idempotent and never removes anything, so
    concurrent calls cannot race each other. It is moved back to the front if someone reset
    or shadowed the filters (pytest does per test). The authoritative limit is still
    ``_check_pixels`` below, which refuses oversized images from their header alone; this
    covers the sizes Pillow checks inside its plugins (GIF frames, TIFF tiles).
    """
    if warnings.filters[:1] != [_BOMB_FILTER]:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _fail(name: str, code: str, detail: str, *, retryable: bool = False) -> ImageError:
    return ImageError(f"{name}: {detail}", code=code, retryable=retryable)


# Leading bytes of allowed formats, to tell "a variant Pillow cannot parse" from "not an image".
_ALLOWED_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
)


def _describe_unknown(data: bytes) -> str:
    for signature, kind in _ALLOWED_SIGNATURES:
        if data.startswith(signature):
            return f"looks like {kind} but its header is incomplete or an unsupported variant"
    head = data[:16].lstrip()
    for signature, kind in _REFUSED_SIGNATURES:
        if head.startswith(signature):
            return f"{kind} is not an allowed image format"
    return "not an image in an allowed format (" + ", ".join(ALLOWED_FORMATS) + ")"


#: Pillow's own limit as imported, restored whenever no decode holds it (``_pillow_limit``).
_PILLOW_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS
_limit_lock = threading.Lock()
_active_limits: collections.Counter[int] = collections.Counter()


@contextlib.contextmanager
def _pillow_limit(limit: int) -> Iterator[None]:
    """Pillow's bomb guard set to ``limit`` (``[imaging] max_pixels``) while this decode runs.

    Pillow keeps its limit in one module global (``Image.MAX_IMAGE_PIXELS``, 89.5 MP by default)
    and checks it inside its plugins (GIF frames, TIFF tiles) where our header check cannot; left
    alone it would refuse a 100 MP photo that the setting allows, and lowering our setting would
    not reach it. Decodes in one process may overlap (threads with different settings): each one
    registers its limit and the global is the largest one registered, so a Pillow check is
    never stricter than the call's setting; one that is looser for a moment (another thread's
    larger limit) is still caught by ``_check_pixels`` from the header and again after ``load``.
    The daemon decodes in worker processes, one image at a time each, where this is one limit.
    """
    with _limit_lock:
        _active_limits[limit] += 1
        Image.MAX_IMAGE_PIXELS = max(_active_limits)
    try:
        yield
    finally:
        with _limit_lock:
            _active_limits[limit] -= 1
            if not _active_limits[limit]:
                del _active_limits[limit]
            Image.MAX_IMAGE_PIXELS = max(_active_limits) if _active_limits else _PILLOW_DEFAULT_LIMIT


def _bomb(name: str, limit: int, detail: str) -> ImageError:
    return _fail(name, "image_bomb", f"{detail} exceeds the limit of {limit} pixels ([imaging] max_pixels)")


_PILLOW_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def _pillow_bomb(name: str, limit: int, error: Exception) -> ImageError:
    """Pillow's refusal (from the header in ``Image.open``, or inside a plugin), quoting the
    setting: Pillow's own text names twice the limit for the sizes it refuses outright
    (``DecompressionBombError``), which is no number the user set."""
    found = _PILLOW_SIZE.search(str(error))
    size = f"{found.group(1)} pixels" if found else "a size"
    return _bomb(name, limit, size)


def _check_pixels(im: Image.Image, name: str, limit: int) -> None:
    width, height = im.size
    if width * height > limit:
        raise _bomb(name, limit, f"{width}x{height} ({width * height} pixels)")


def _open(data: bytes, name: str, limit: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise _fail(name, "image_format_unsupported", _describe_unknown(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _pillow_bomb(name, limit, e) from None
    except Exception as e:  # hostile headers make plugins raise anything
        raise _fail(name, "image_corrupt", f"unreadable {type(e).__name__}: {e}") from None


def _load(im: Image.Image, name: str, limit: int) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _pillow_bomb(name, limit, e) from None
    except MemoryError:
        raise _fail(name, "image_bomb", "decoding ran out of memory") from None
    except Exception as e:  # hostile data make decoders raise anything
        text = str(e)
        if isinstance(e, EOFError) or "truncated" in text.lower():
            raise _fail(name, "image_truncated", f"the data ends early ({text or type(e).__name__})") from None
        raise _fail(name, "image_corrupt", f"cannot decode ({type(e).__name__}: {text})") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block must not sink a decodable image
        return 1
    return value if isinstance(value, int) else 1


def _scale_to_l(im: Image.Image, low: float, high: float) -> Image.Image:
    """Map ``low..high`` linearly onto 0..255 (rounded) in mode L."""
    if high <= low:
        return Image.new("L", im.size, 0)
    scale = 255.0 / (high - low)
    return im.point(lambda v: v * scale - low * scale + 0.5).convert("L")


def _deep_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey to 8 bits by scaling, never by clipping."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return _scale_to_l(im.convert("I"), 0, 65535)
    low, high = im.getextrema()
    if im.mode == "F" and low >= 0 and high <= 1:
        return _scale_to_l(im, 0, 1)
    if im.mode == "I" and low >= 0 and high <= 65535:
        return _scale_to_l(im, 0, 65535)
    return _scale_to_l(im, low, high)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB", "1") and "transparency" in im.info)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        im = _deep_to_l(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned as the EXIF ``orientation`` (1-8) says."""
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    return image.transpose(transpose) if transpose is not None else image


def decode_image(data: bytes, *, name: str, settings: ImagingSettings, orient: bool = True) -> Image.Image:
    """Decode ``data`` into a fully loaded 8-bit RGB image, upright, first frame only.

    ``name`` (a path or URL) labels error messages; one with a camera raw extension is decoded by
    LibRaw (``raw_decode``). Raises ``ImageError`` (see the module docstring for the codes).
    ``orient=False``: the EXIF orientation is not applied (a raw's preview, which its raw turns).
    """
    if not data:
        raise _fail(name, "image_empty", "the file is empty")
    if len(data) > settings.max_file_bytes:
        raise _fail(name, "image_too_large", f"{len(data)} bytes exceeds the limit of {settings.max_file_bytes}")
    if is_raw_name(name):
        from phicapd.raw_decode import decode_raw  # it imports this module

        return decode_raw(data, name=name, settings=settings)
    _escalate_bomb_warnings()
    limit = settings.max_pixels
    with _pillow_limit(limit):
        im = _open(data, name, limit)
        # Defence in depth: an allowed opener may hand back a subtype.
        if im.format not in ALLOWED_FORMATS and im.format not in _RESULT_ALIASES:
            raise _fail(name, "image_format_unsupported", f"{im.format} is not an allowed image format")
        _check_pixels(im, name, limit)
        _load(im, name, limit)
    _check_pixels(im, name, limit)  # a first frame may be larger than the header said
    orientation = _orientation(im) if orient else 1
    try:
        rgb = _to_rgb(im)
    except Exception as e:  # e.g. a palette that does not match its data
        raise _fail(name, "image_corrupt", f"cannot convert {im.mode} to RGB ({e})") from None
    return upright(rgb, orientation)


def read_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a regular file, at most ``max_bytes``; return its bytes and the stat of what was read."""
    name = str(path)
    # O_NONBLOCK: opening a FIFO must not hang waiting for a writer; fstat then refuses it.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _fail(name, "image_missing", "the file no longer exists") from None
    except OSError as e:
        raise _fail(name, "image_unreadable", f"cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(name, "image_unreadable", "not a regular file")
        if st.st_size > max_bytes:
            raise _fail(name, "image_too_large", f"{st.st_size} bytes exceeds the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)  # the file may grow after fstat
    except OSError as e:
        raise _fail(name, "image_unreadable", f"cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _fail(name, "image_too_large", f"more than {max_bytes} bytes")
    return data, st


def decode_file(path: Path, settings: ImagingSettings, *, min_age_seconds: float = 0) -> Image.Image:
    """Read and decode the regular file at ``path`` (see ``decode_image`` and ``decode_read``)."""
    data, st = read_file(path, settings.max_file_bytes)
    return decode_read(data, path, st.st_mtime, settings, min_age_seconds=min_age_seconds)


def decode_read(
    data: bytes, path: Path, mtime: float, settings: ImagingSettings, *, min_age_seconds: float = 0
) -> Image.Image:
    """Decode bytes read from ``path`` (last modified at ``mtime``).

    A file modified less than ``min_age_seconds`` ago that fails the way a partial write would
    (empty, truncated, corrupt, or too short to recognise) raises the retryable
    ``image_incomplete`` instead: it may still be being written.
    """
    try:
        return decode_image(data, name=str(path), settings=settings)
    except ImageError as e:
        age = time.time() - mtime
        looks_partial = e.code in _PARTIAL_WRITE_CODES or (
            e.code == "image_format_unsupported" and len(data) < _SHORTER_THAN_A_HEADER
        )
        if looks_partial and age < min_age_seconds:
            raise _fail(
                str(path),
                "image_incomplete",
                f"incomplete, modified {age:.1f}s ago, may still be being written ({e.code})",
                retryable=True,
            ) from e
        raise
