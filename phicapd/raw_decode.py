"""Camera raw files (CR2, CR3, NEF, ARW, DNG, ORF, RW2, RAF, ...) to an upright 8-bit RGB image,
through LibRaw (the ``rawpy`` binding, ``pip install 'phicapd[raw]'``).

Why LibRaw: every maker writes its own container (TIFF variants, Canon's ISO-BMFF CR3, Fuji's
RAF, Panasonic's RW2) and hides its previews in its own places (maker notes, sub-IFDs, private
boxes). LibRaw knows them all and picks the largest embedded preview itself, and it can develop
the sensor data when there is none. exiv2 knows the containers too, but pyexiv2 exposes only
the EXIF thumbnail (``read_thumbnail``: ``Exiv2::ExifThumb``, 160 px), not exiv2's
``PreviewManager``, and it cannot develop a raw.

What the model sees, in this order:

1. the largest embedded preview (a JPEG, or a bitmap), when its long side is at least
   ``MIN_PREVIEW_SIDE``: the camera's own rendering (its white balance, tone curve and lens
   corrections) of the whole frame, decoded in milliseconds;
2. else LibRaw's half-size development of the sensor data (``postprocess(half_size=True)``: one
   RGB pixel per 2x2 block, no interpolation, the camera's white balance), which still gives the
   model more pixels than it takes (``num_crops`` 336-px tiles, 1344 px across at 16);
3. a smaller preview is used when there is nothing to develop: when the development fails, and
   when the file holds no sensor mosaic (a film scanner's NEF, which holds RGB that LibRaw's
   processing, built for mosaics, turns into a white frame).

The file's orientation (LibRaw's ``sizes.flip``, from the raw's own EXIF) is applied to
whichever it is, so the model sees the photo upright: previews are stored as the sensor saw
them, and a preview's own EXIF orientation is ignored (it would rotate twice).

Limits and errors as for every image (``imaging``): a JPEG preview is decoded by ``imaging``
itself (format allow-list, ``max_pixels`` from its header, truncation checked); a bitmap preview
and a development are refused as ``image_bomb`` when their size exceeds ``max_pixels`` (the
development judged by the raw's size, before LibRaw unpacks a byte of it). LibRaw's own errors
get the codes of ``imaging``: a file whose data ends early, or points past its end,
``image_truncated``; undecodable data ``image_corrupt``; a file LibRaw does not recognise
``image_format_unsupported``. LibRaw runs where every decoder runs, in a decode worker process
(``pipeline.decode_pool``), so a raw that crashes it costs that worker only.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image

from phicapd.errors import ImageError

if TYPE_CHECKING:  # not imported at run time: the decode workers start without pydantic
    from phicapd.config import ImagingSettings

#: The shortest long side of an embedded preview that is used rather than developing the raw.
#: Phi-3.5-vision reads an image as up to ``num_crops`` 336-px tiles (16: 1344 px across) plus a
#: 336-px overview; from 1000 px a preview fills three tiles across, plenty for a caption, and
#: takes in the previews most cameras write (Sony 1616 px, Olympus 1600+, Panasonic and Fuji
#: 1920, Canon and Nikon full size, Adobe's DNG Converter 1024). Below it sit the 160-320 px
#: thumbnails some files hold alone: a blur to the model, so the raw is developed instead.
MIN_PREVIEW_SIDE = 1000

#: LibRaw's ``flip`` (dcraw's code: bit 2 transposes, bit 1 flips vertically, bit 0
#: horizontally) as the EXIF orientation it was read from (dcraw: ``"50132467"[orientation & 7]``).
FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}

INSTALL_HINT = "camera raw files need rawpy (pip install 'phicapd[raw]')"


def _fail(name: str, code: str, detail: str) -> ImageError:
    return ImageError(f"{name}: {detail}", code=code)


def _rawpy(name: str) -> Any:
    try:
        import rawpy  # type: ignore[import-not-found]
    except ImportError:
        raise _fail(name, "image_format_unsupported", INSTALL_HINT) from None
    return rawpy


@contextlib.contextmanager
def _libraw_errors(name: str, rawpy: Any) -> Iterator[None]:
    """LibRaw's exceptions as ``ImageError`` codes (see the module docstring)."""
    try:
        yield
    except ImageError:
        raise
    except rawpy.LibRawFileUnsupportedError:
        raise _fail(name, "image_format_unsupported", "not a camera raw file LibRaw reads") from None
    except rawpy.LibRawIOError as e:
        raise _fail(name, "image_truncated", f"the raw data ends early or points past its end ({_text(e)})") from None
    except (rawpy.LibRawUnsufficientMemoryError, rawpy.LibRawMemPoolOverflowError, MemoryError):
        raise _fail(name, "image_bomb", "decoding the raw ran out of memory") from None
    except Exception as e:  # LibRaw's data errors, and whatever a hostile file makes it raise
        raise _fail(name, "image_corrupt", f"cannot decode the raw ({type(e).__name__}: {_text(e)})") from None


def _text(error: Exception) -> str:
    """LibRaw's message (rawpy passes its C string as bytes)."""
    arg = error.args[0] if error.args else ""
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg or type(error).__name__)


def _check(name: str, width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        detail = f"{what} {width}x{height} ({width * height} pixels) exceeds the limit of {limit} pixels"
        raise _fail(name, "image_bomb", f"{detail} ([imaging] max_pixels)")


def _from_array(pixels: Any, name: str, what: str) -> Image.Image:
    """An ``(h, w, c)`` array of 8- or 16-bit samples (1 or 3 channels) as an RGB image."""
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise _fail(name, "image_corrupt", f"the {what} has an unusable shape {tuple(pixels.shape)}")
    if pixels.dtype.itemsize == 2:
        pixels = (pixels >> 8).astype("uint8")
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    image = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode)
    return image.convert("RGB") if mode == "L" else image


def _preview(raw: Any, rawpy: Any, name: str, settings: ImagingSettings) -> Image.Image | None:
    """The largest embedded preview, or None when the file has none that decodes."""
    from phicapd.imaging import decode_image

    try:
        thumb = raw.extract_thumb()
    except Exception:  # none, an unsupported kind, or a broken one: the raw is developed instead
        return None
    label = f"{name} (embedded preview)"
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return decode_image(bytes(thumb.data), name=label, settings=settings, orient=False)
    height, width = thumb.data.shape[:2]
    _check(label, width, height, settings.max_pixels, "the preview")
    return _from_array(thumb.data, label, "preview")


def _develop(raw: Any, name: str, settings: ImagingSettings) -> Image.Image:
    """LibRaw's half-size development, unrotated (``_upright`` rotates)."""
    sizes = raw.sizes
    _check(name, sizes.width, sizes.height, settings.max_pixels, "the raw image")
    pixels = raw.postprocess(half_size=True, use_camera_wb=True, user_flip=0, output_bps=8)
    return _from_array(pixels, name, "developed image")


def decode_raw(data: bytes, *, name: str, settings: ImagingSettings) -> Image.Image:
    """Decode the camera raw file ``data`` into a fully loaded, upright 8-bit RGB image.

    ``name`` labels error messages. Raises ``ImageError`` (codes: see the module docstring).
    """
    from phicapd.imaging import upright

    rawpy = _rawpy(name)
    with _libraw_errors(name, rawpy), rawpy.imread(io.BytesIO(data)) as raw:
        flip = raw.sizes.flip
        # The preview first: rawpy lets go of the file's bytes once the sensor data is unpacked.
        try:
            preview = _preview(raw, rawpy, name, settings)
        except ImageError:  # a broken or oversized preview: the raw is developed instead
            preview = None
        mosaic = raw.raw_type == rawpy.RawType.Flat
        if preview is not None and (max(preview.size) >= MIN_PREVIEW_SIDE or not mosaic):
            image = preview
        else:
            try:
                image = _develop(raw, name, settings)
            except Exception:
                if preview is None:
                    raise
                image = preview
    return upright(image, FLIP_TO_ORIENTATION.get(flip, 1))
