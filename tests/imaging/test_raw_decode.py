"""Camera raw files through LibRaw (``phicapd.raw_decode``): the real samples in tests/data/raw,
upright, within the pixel limit, and failing with a code when cut short or broken."""

from __future__ import annotations

import io
import os
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from phicapd import image_types, raw_decode
from phicapd.config import ImagingSettings
from phicapd.errors import ImageError
from phicapd.imaging import decode_image, decode_read, upright

rawpy = pytest.importorskip("rawpy", reason="needs rawpy (pip install 'phicapd[raw]')")

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
DNG = RAW / "blackmagic_pocket_4k.dng"  # a Bayer mosaic, no preview: developed
NEF = RAW / "nikon_coolscan.nef"  # a film scan: RGB, no mosaic, a 320x218 bitmap preview
STUB = RAW / "exiftool_nikon_no_image_data.nef"  # a NEF's metadata, its image data cut out
SETTINGS = ImagingSettings()


def with_orientation(data: bytes, orientation: int) -> bytes:
    """``data`` (a little-endian TIFF-based raw) with every EXIF Orientation entry set to
    ``orientation``: the same photo as a camera held on its side would have tagged it."""
    entry = struct.pack("<HHI", 0x0112, 3, 1)  # tag, SHORT, count 1; the value follows
    out = bytearray(data)
    at = out.find(entry)
    assert at != -1, "no Orientation entry"
    while at != -1:
        out[at + 8 : at + 10] = struct.pack("<H", orientation)
        at = out.find(entry, at + 1)
    return bytes(out)


def mean(image: Image.Image) -> float:
    return float(np.asarray(image).mean())


def test_a_dng_without_a_preview_is_developed_at_half_size() -> None:
    image = decode_image(DNG.read_bytes(), name=str(DNG), settings=SETTINGS)
    assert image.mode == "RGB" and image.size == (2064, 1088)  # 4128x2176 halved
    assert 40 < mean(image) < 200  # a daylight scene, neither black nor blown out


def test_a_scanners_nef_is_read_from_its_preview_not_developed_into_a_white_frame() -> None:
    image = decode_image(NEF.read_bytes(), name=str(NEF), settings=SETTINGS)
    assert image.mode == "RGB" and image.size == (320, 218)
    with rawpy.imread(str(NEF)) as raw:
        developed = raw.postprocess(half_size=True, use_camera_wb=True)
    assert developed.mean() > 200  # what LibRaw's processing makes of the scan
    assert mean(image) < 150


@pytest.mark.parametrize(("path", "name"), [(DNG, "photo.DNG"), (NEF, "scan.NEF")])
@pytest.mark.parametrize(("orientation", "turned"), [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_the_raws_orientation_is_applied(path: Path, name: str, orientation: int, turned: Image.Transpose) -> None:
    level = decode_image(path.read_bytes(), name=name, settings=SETTINGS)
    rotated = decode_image(with_orientation(path.read_bytes(), orientation), name=name, settings=SETTINGS)
    assert rotated.size == level.size[::-1]  # portrait
    assert np.array_equal(np.asarray(rotated), np.asarray(level.transpose(turned)))


def test_every_flip_turns_the_image_as_libraw_turns_its_own_output() -> None:
    with rawpy.imread(str(DNG)) as raw:
        level = Image.fromarray(raw.postprocess(half_size=True, user_flip=0))
    for flip, orientation in raw_decode.FLIP_TO_ORIENTATION.items():
        with rawpy.imread(str(DNG)) as raw:
            libraw = raw.postprocess(half_size=True, user_flip=flip)
        assert np.array_equal(np.asarray(upright(level, orientation)), libraw), flip


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (DNG.read_bytes()[: DNG.stat().st_size // 2], "image_truncated"),
        (NEF.read_bytes()[:300_000], "image_truncated"),
        (STUB.read_bytes(), "image_corrupt"),
        (b"not a raw file, whatever its name says " * 40, "image_format_unsupported"),
    ],
    ids=["dng-cut-in-half", "nef-cut-short", "no-image-data", "not-a-raw"],
)
def test_a_broken_raw_fails_with_a_code(data: bytes, code: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, name="/photos/DSC_0001.NEF", settings=SETTINGS)
    assert caught.value.code == code and not caught.value.retryable
    assert str(caught.value).startswith("/photos/DSC_0001.NEF: ")


def test_a_raw_still_being_copied_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "DSC_0001.dng"
    path.write_bytes(DNG.read_bytes()[:1_000_000])
    with pytest.raises(ImageError) as caught:
        decode_read(path.read_bytes(), path, time.time(), SETTINGS, min_age_seconds=30)
    assert caught.value.code == "image_incomplete" and caught.value.retryable


@pytest.mark.parametrize(("path", "limit", "size"), [(DNG, 4_000_000, "4128x2176"), (NEF, 50_000, "869x593")])
def test_max_pixels_is_the_limit_for_raws_and_their_previews(path: Path, limit: int, size: str) -> None:
    settings = ImagingSettings(max_pixels=limit)
    with pytest.raises(ImageError, match=f"{size} .* exceeds the limit of {limit} pixels") as caught:
        decode_image(path.read_bytes(), name=path.name, settings=settings)
    assert caught.value.code == "image_bomb"
    assert decode_image(path.read_bytes(), name=path.name, settings=ImagingSettings(max_pixels=9_000_000))


def test_without_rawpy_a_raw_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)
    with pytest.raises(ImageError, match=r"pip install 'phicapd\[raw\]'") as caught:
        decode_image(DNG.read_bytes(), name="a.dng", settings=SETTINGS)
    assert caught.value.code == "image_format_unsupported"


# --- which picture: a fake LibRaw with a preview of any size, so every branch is taken --------
class _FakeRaw:
    def __init__(self, preview: tuple[int, int] | None, develops: bool, flip: int = 0) -> None:
        self.preview, self.develops = preview, develops
        self.sizes = SimpleNamespace(width=4000, height=3000, flip=flip)
        self.raw_type = "flat"
        self.developed = False

    def __enter__(self) -> _FakeRaw:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def extract_thumb(self) -> Any:
        if self.preview is None:
            raise _FakeRawpy.LibRawNoThumbnailError(b"No thumbnail in file")
        buf = io.BytesIO()
        Image.new("RGB", self.preview, (200, 30, 30)).save(buf, "JPEG")
        return SimpleNamespace(format="jpeg", data=buf.getvalue())

    def postprocess(self, **params: Any) -> Any:
        assert params["half_size"] and params["user_flip"] == 0
        if not self.develops:
            raise _FakeRawpy.LibRawDataError(b"Data error or unsupported file format")
        self.developed = True
        return np.full((1500, 2000, 3), 90, dtype=np.uint8)


class _FakeRawpy:
    class LibRawError(Exception):
        pass

    class LibRawFileUnsupportedError(LibRawError):
        pass

    class LibRawIOError(LibRawError):
        pass

    class LibRawUnsufficientMemoryError(LibRawError):
        pass

    class LibRawMemPoolOverflowError(LibRawError):
        pass

    class LibRawNoThumbnailError(LibRawError):
        pass

    class LibRawDataError(LibRawError):
        pass

    ThumbFormat = SimpleNamespace(JPEG="jpeg", BITMAP="bitmap")
    RawType = SimpleNamespace(Flat="flat", Stack="stack")

    def __init__(self, raw: _FakeRaw) -> None:
        self.raw = raw

    def imread(self, _: Any) -> _FakeRaw:
        return self.raw


def _decode(monkeypatch: pytest.MonkeyPatch, raw: _FakeRaw) -> Image.Image:
    monkeypatch.setattr(raw_decode, "_rawpy", lambda name: _FakeRawpy(raw))
    return decode_image(b"II*\x00raw", name="IMG_0001.CR2", settings=SETTINGS)


@pytest.mark.parametrize("side", [raw_decode.MIN_PREVIEW_SIDE, 1620, 5472])
def test_a_preview_big_enough_is_used_and_nothing_is_developed(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    raw = _FakeRaw((side, side * 2 // 3), develops=True)
    image = _decode(monkeypatch, raw)
    assert image.size == (side, side * 2 // 3) and not raw.developed


def test_a_small_preview_gives_way_to_the_development(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _FakeRaw((160, 120), develops=True)
    assert _decode(monkeypatch, raw).size == (2000, 1500) and raw.developed


def test_a_small_preview_is_used_when_the_raw_does_not_develop(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _FakeRaw((640, 480), develops=False, flip=6)
    assert _decode(monkeypatch, raw).size == (480, 640)  # turned upright


def test_no_preview_and_no_development_is_image_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError) as caught:
        _decode(monkeypatch, _FakeRaw(None, develops=False))
    assert caught.value.code == "image_corrupt" and "LibRawDataError" in str(caught.value)


def test_raw_files_join_the_default_include_where_rawpy_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    for available in (True, False):
        monkeypatch.setattr(image_types, "raw_available", lambda available=available: available)
        assert (".nef" in image_types.default_extensions()) is available
        assert (".nef" in image_types.unreadable_extensions()) is not available
    assert os.path.splitext(DNG.name)[1] in image_types.RAW_EXTENSIONS
