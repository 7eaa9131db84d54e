"""The safe decoder against the hostile-image set, every mode, and real photos."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from phicapd import imaging
from phicapd.config import ImagingSettings
from phicapd.errors import ImageError
from phicapd.imaging import decode_file, decode_image


# --- the hostile set, generated here so every byte is visible --------------------------------
def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int) -> bytes:
    """A valid all-black greyscale PNG of side x side pixels that is tiny on disk."""
    row = b"\0" * (side + 1)  # filter byte + pixels
    rows_per_call = 64
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * rows_per_call) for _ in range(side // rows_per_call)]
    parts.append(compressor.compress(row * (side % rows_per_call)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def gif_with_oversized_frame(width: int, height: int) -> bytes:
    """A 1x1-screen GIF whose first frame claims width x height (Pillow grows the canvas)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


def eps_document() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
    )


def pdf_document() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
        b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    )


def jpeg_with_orientation(size: tuple[int, int], orientation: int) -> bytes:
    im = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan


def png16(values: list[int]) -> bytes:
    im = Image.new("I;16", (len(values), 1))
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    return encode(im, "PNG")


def rgba_png() -> bytes:
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # left: fully transparent black
    im.putpixel((1, 0), (10, 20, 30, 255))
    return encode(im, "PNG")


def palette_transparent_png() -> bytes:
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    return encode(im, "PNG", transparency=0)


def animated_gif(frames: int) -> bytes:
    first = Image.new("P", (16, 16), 1)
    first.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    rest = []
    for i in range(frames - 1):
        frame = Image.new("P", (16, 16), 2)
        frame.putpalette(first.getpalette())
        frame.putpixel((i % 16, 0), 0)  # differ, so the encoder keeps every frame
        rest.append(frame)
    return encode(first, "GIF", save_all=True, append_images=rest, duration=10, loop=0)


def truncated_jpeg() -> bytes:
    full = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG", quality=90)
    return full[: len(full) // 2]


@pytest.fixture(scope="session")
def hostile_images() -> dict[str, bytes]:
    """Every case of the must-show set, by a name that says what it is."""
    return {
        "empty.jpg": b"",
        "text.jpg": b"just some text, not an image\n" * 4,
        "eps.jpg": eps_document(),
        "pdf.jpg": pdf_document(),
        "truncated.jpg": truncated_jpeg(),
        "bomb.png": png_bomb(20000),
        "cmyk.jpg": cmyk_jpeg(),
        "png16.png": png16([0, 32768, 65535, 256]),
        "rgba.png": rgba_png(),
        "ptrans.png": palette_transparent_png(),
        "anim500.gif": animated_gif(500),
        "orient6.jpg": jpeg_with_orientation((40, 20), 6),
    }


@pytest.fixture
def settings() -> ImagingSettings:
    return ImagingSettings()


@pytest.fixture
def make_settings() -> Callable[..., ImagingSettings]:
    return lambda **kw: ImagingSettings(**kw)


def _decode(data: bytes, name: str = "input.jpg", **limits: int) -> Image.Image:
    return decode_image(data, name=name, settings=ImagingSettings(**limits))


def _error(data: bytes, name: str = "input.jpg", **limits: int) -> ImageError:
    with pytest.raises(ImageError) as info:
        _decode(data, name, **limits)
    assert name in str(info.value), "every error names its input"
    return info.value


def _pixels(im: Image.Image) -> list[tuple[int, int, int]]:
    return list(im.get_flattened_data())


# --- refused inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("empty.jpg", "image_empty", "empty"),
        ("text.jpg", "image_format_unsupported", "allowed"),
        ("eps.jpg", "image_format_unsupported", "EPS"),
        ("pdf.jpg", "image_format_unsupported", "PDF"),
        ("truncated.jpg", "image_truncated", "ends early"),
        ("bomb.png", "image_bomb", "pixels"),
    ],
)
def test_hostile_inputs_get_their_code(hostile_images: dict[str, bytes], case: str, code: str, words: str):
    err = _error(hostile_images[case], name=f"/watched/{case}")
    assert err.code == code
    assert words in str(err)
    assert err.retryable is False


@pytest.fixture
def eps_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record any contact with the EPS plugin or a subprocess (Ghostscript runs as one)."""
    calls: list[str] = []
    Image.init()
    factory, accept = Image.OPEN["EPS"]

    def spying_accept(prefix: bytes) -> bool:
        calls.append("EPS accept")
        return accept(prefix)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        calls.append(f"subprocess {args!r}")
        raise OSError("subprocesses are forbidden in this test")

    monkeypatch.setitem(Image.OPEN, "EPS", (factory, spying_accept))
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append("Ghostscript"))
    return calls


@pytest.mark.parametrize("case", ["eps.jpg", "pdf.jpg"])
def test_eps_and_pdf_never_reach_a_plugin_or_ghostscript(
    hostile_images: dict[str, bytes], eps_spy: list[str], case: str
):
    assert _error(hostile_images[case]).code == "image_format_unsupported"
    assert eps_spy == []


def test_eps_spy_would_see_an_unrestricted_open(eps_spy: list[str]):
    # Control: without the allow-list Pillow hands these bytes to the EPS plugin.
    assert Image.open(io.BytesIO(eps_document())).format == "EPS"
    assert "EPS accept" in eps_spy


def test_png_bomb_is_small_and_refused_fast(hostile_images: dict[str, bytes]):
    bomb = hostile_images["bomb.png"]
    assert len(bomb) < 1_000_000
    started = time.monotonic()
    assert _error(bomb).code == "image_bomb"
    assert time.monotonic() - started < 1.0


def test_pixel_limit_comes_from_settings():
    data = encode(Image.new("RGB", (300, 300)), "PNG")
    assert _error(data, max_pixels=300 * 300 - 1).code == "image_bomb"
    assert _decode(data, max_pixels=300 * 300).size == (300, 300)


def test_bomb_below_pillows_hard_limit_is_still_refused():
    # 3000x3000 is far under Pillow's default limit; only our setting refuses it.
    assert _error(png_bomb(3000), max_pixels=1_000_000).code == "image_bomb"


def test_pillow_bomb_warning_is_an_error_even_if_warnings_are_ignored():
    # The frame is larger than the GIF's screen: Pillow checks that size itself, inside the
    # plugin, against our setting, and only warns (100 M pixels is between the setting and twice it).
    data = gif_with_oversized_frame(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = _error(data, name="frame.gif", max_pixels=60_000_000)
    assert err.code == "image_bomb"
    assert "100000000 pixels exceeds the limit of 60000000 pixels ([imaging] max_pixels)" in str(err)


def _one_colour_png(width: int, height: int) -> bytes:
    """A large image in a few hundred KB: one colour compresses to almost nothing."""
    return encode(Image.new("L", (width, height), 128), "PNG")


def test_max_pixels_above_pillows_default_is_the_limit():
    """A 100 MP photo (over Pillow's 89.5 MP default) decodes when the setting allows it, and is
    refused under the default setting with a message quoting the setting, not Pillow's limit."""
    data = _one_colour_png(10_000, 10_000)
    assert _decode(data, max_pixels=120_000_000).size == (10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == imaging._PILLOW_DEFAULT_LIMIT  # given back after the decode
    err = _error(data, name="big.png")
    assert err.code == "image_bomb"
    assert str(err) == "big.png: 100000000 pixels exceeds the limit of 64000000 pixels ([imaging] max_pixels)"


def test_pillows_guard_follows_each_calls_setting_across_threads():
    """Overlapping decodes with different settings: Pillow's global is the largest one running,
    and each call still refuses what its own setting does not allow."""
    started, release = threading.Event(), threading.Event()
    seen: list[int | None] = []

    def slow_decode() -> None:
        with imaging._pillow_limit(120_000_000):
            started.set()
            release.wait(10)

    thread = threading.Thread(target=slow_decode)
    thread.start()
    try:
        assert started.wait(10)
        with imaging._pillow_limit(1_000_000):
            seen.append(Image.MAX_IMAGE_PIXELS)
        seen.append(Image.MAX_IMAGE_PIXELS)
        assert _error(_one_colour_png(2000, 2000), max_pixels=1_000_000).code == "image_bomb"
    finally:
        release.set()
        thread.join()
    assert seen == [120_000_000, 120_000_000]
    assert Image.MAX_IMAGE_PIXELS == imaging._PILLOW_DEFAULT_LIMIT


def test_file_size_cap():
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert _error(data, max_file_bytes=len(data) - 1).code == "image_too_large"
    assert _decode(data, max_file_bytes=len(data)).mode == "RGB"


def test_corrupt_data_after_a_valid_header():
    good = encode(Image.effect_noise((64, 64), 50), "PNG")
    idat = good.index(b"IDAT") + 4
    garbled = good[:idat] + bytes(b ^ 0x5A for b in good[idat : idat + 200]) + good[idat + 200 :]
    assert _error(garbled, name="garbled.png").code in {"image_corrupt", "image_truncated"}


# --- files: truncation while young, non-regular files -----------------------------------------


def _write(path: Path, data: bytes, *, age: float = 0) -> Path:
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_truncated_old_file_fails_permanently(tmp_path: Path, settings: ImagingSettings):
    path = _write(tmp_path / "old.jpg", truncated_jpeg(), age=3600)
    with pytest.raises(ImageError) as info:
        decode_file(path, settings, min_age_seconds=5)
    assert (info.value.code, info.value.retryable) == ("image_truncated", False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [truncated_jpeg(), b"", b"\xff\xd8"], ids=["truncated", "empty", "header"])
def test_young_partial_file_is_retryable(tmp_path: Path, settings: ImagingSettings, data: bytes):
    path = _write(tmp_path / "young.jpg", data)
    with pytest.raises(ImageError) as info:
        decode_file(path, settings, min_age_seconds=5)
    assert (info.value.code, info.value.retryable) == ("image_incomplete", True)
    assert str(path) in str(info.value)


def test_young_but_refused_for_other_reasons_is_not_retried(tmp_path: Path):
    path = _write(tmp_path / "big.png", png_bomb(2000))
    with pytest.raises(ImageError) as info:
        decode_file(path, ImagingSettings(max_pixels=1000), min_age_seconds=5)
    assert info.value.code == "image_bomb"


def test_decode_file_refuses_non_regular_and_missing_files(tmp_path: Path, settings: ImagingSettings):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    for path, code in (
        (fifo, "image_unreadable"),
        (folder, "image_unreadable"),
        (tmp_path / "gone.jpg", "image_missing"),
    ):
        with pytest.raises(ImageError) as info:
            decode_file(path, settings)  # a FIFO must not block waiting for a writer
        assert info.value.code == code
        assert str(path) in str(info.value)


def test_young_partial_writes_are_retryable_young_garbage_is_not(tmp_path: Path, settings: ImagingSettings):
    partial = _write(tmp_path / "partial.png", b"\x89PNG")  # a writer that has only just started
    with pytest.raises(ImageError) as info:
        decode_file(partial, settings, min_age_seconds=30)
    assert info.value.code == "image_incomplete" and info.value.retryable
    garbage = _write(tmp_path / "notes.png", b"this is a text file, not a picture\n" * 4)
    with pytest.raises(ImageError) as info:
        decode_file(garbage, settings, min_age_seconds=30)
    assert info.value.code == "image_format_unsupported" and not info.value.retryable


def test_decode_file_size_cap_before_reading(tmp_path: Path):
    path = _write(tmp_path / "huge.jpg", b"\xff\xd8\xff" + b"\0" * 4096)
    with pytest.raises(ImageError) as info:
        decode_file(path, ImagingSettings(max_file_bytes=1024))
    assert info.value.code == "image_too_large"


# --- correct RGB out of every mode -------------------------------------------------------------


def test_cmyk_jpeg(hostile_images: dict[str, bytes]):
    im = _decode(hostile_images["cmyk.jpg"])
    assert im.mode == "RGB"
    r, g, b = im.getpixel((5, 5))
    assert r < 20 and g > 235 and b > 235, "pure cyan stays cyan"


def test_16_bit_png_is_scaled_not_saturated(hostile_images: dict[str, bytes]):
    im = _decode(hostile_images["png16.png"])
    assert [p[0] for p in _pixels(im)] == [0, 128, 255, 1]


def test_alpha_is_composited_on_white(hostile_images: dict[str, bytes]):
    assert _pixels(_decode(hostile_images["rgba.png"])) == [(255, 255, 255), (10, 20, 30)]
    assert _pixels(_decode(hostile_images["ptrans.png"])) == [(255, 255, 255), (0, 200, 0)]


def test_first_frame_of_a_500_frame_gif_fast(hostile_images: dict[str, bytes]):
    data = hostile_images["anim500.gif"]
    assert Image.open(io.BytesIO(data)).n_frames == 500
    started = time.monotonic()
    im = _decode(data, name="anim.gif")
    assert time.monotonic() - started < 0.5
    assert im.mode == "RGB"
    assert set(_pixels(im)) == {(255, 0, 0)}


def test_exif_orientation_6_rotates(hostile_images: dict[str, bytes]):
    im = _decode(hostile_images["orient6.jpg"])
    assert im.size == (20, 40)


def test_every_orientation_gives_upright_dimensions():
    for orientation in range(1, 9):
        expected = (40, 20) if orientation <= 4 else (20, 40)
        assert _decode(jpeg_with_orientation((40, 20), orientation)).size == expected


def _single(mode: str, value: object) -> Image.Image:
    im = Image.new(mode, (2, 1))
    im.putpixel((0, 0), value)
    return im


@pytest.mark.parametrize(
    ("im", "fmt", "expected"),
    [
        (_single("1", 1), "PNG", (255, 255, 255)),
        (_single("L", 77), "PNG", (77, 77, 77)),
        (_single("LA", (77, 0)), "PNG", (255, 255, 255)),
        (_single("I;16B", 65535), "TIFF", (255, 255, 255)),
        (_single("I;16", 32768), "TIFF", (128, 128, 128)),
        (_single("I", 32768), "TIFF", (128, 128, 128)),
        (_single("F", 0.5), "TIFF", (128, 128, 128)),
        (_single("CMYK", (0, 255, 0, 0)), "TIFF", (255, 0, 255)),
        (_single("RGB", (1, 2, 3)), "BMP", (1, 2, 3)),
        (_single("RGBA", (9, 9, 9, 255)), "WEBP", None),
    ],
    ids=lambda v: getattr(v, "mode", None) or str(v),
)
def test_modes_to_rgb(im: Image.Image, fmt: str, expected: tuple[int, int, int] | None):
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = _decode(encode(im, fmt, **params), name=f"x.{fmt.lower()}")
    assert out.mode == "RGB"
    if expected is not None:
        assert out.getpixel((0, 0)) == expected


def _pillow_can_decode(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception:
        return False
    return True


def test_real_photos(photos: Path, settings: ImagingSettings):
    decoded = 0
    for path in sorted(photos.iterdir()):
        if not _pillow_can_decode(path):
            # e.g. a float64 multi-page TIFF: refused cleanly, with a code, never a crash.
            with pytest.raises(ImageError) as info:
                decode_file(path, settings)
            assert info.value.code == "image_format_unsupported", path
            continue
        im = decode_file(path, settings)
        with Image.open(path) as original:
            upright = original.size
        assert im.mode == "RGB", path
        assert im.size in {upright, upright[::-1]}, path
        decoded += 1
    assert decoded >= 5


# --- robustness --------------------------------------------------------------------------------


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _decode_all(images: dict[str, bytes]) -> dict[str, str]:
    outcome = {}
    for name, data in images.items():
        try:
            outcome[name] = _decode(data, name=name).mode
        except ImageError as e:
            outcome[name] = e.code
    return outcome


EXPECTED_OUTCOMES = {
    "empty.jpg": "image_empty",
    "text.jpg": "image_format_unsupported",
    "eps.jpg": "image_format_unsupported",
    "pdf.jpg": "image_format_unsupported",
    "truncated.jpg": "image_truncated",
    "bomb.png": "image_bomb",
    "cmyk.jpg": "RGB",
    "png16.png": "RGB",
    "rgba.png": "RGB",
    "ptrans.png": "RGB",
    "anim500.gif": "RGB",
    "orient6.jpg": "RGB",
}


def test_whole_set_in_a_loop_keeps_rss_bounded(hostile_images: dict[str, bytes]):
    assert _decode_all(hostile_images) == EXPECTED_OUTCOMES  # warm up allocators and plugins
    before = _rss_bytes()
    for _ in range(10):
        assert _decode_all(hostile_images) == EXPECTED_OUTCOMES
    assert _rss_bytes() - before < 500 * 1024 * 1024


def test_concurrent_decodes_in_a_thread_pool(hostile_images: dict[str, bytes]):
    extra = {"frame.gif": gif_with_oversized_frame(10_000, 10_000), "anim.gif": animated_gif(3)}
    cases = list(hostile_images.items()) + list(extra.items())
    expected = {**EXPECTED_OUTCOMES, "frame.gif": "image_bomb", "anim.gif": "RGB"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda item: _decode_all(dict([item])), cases * 3))
    for result in results:
        ((name, outcome),) = result.items()
        assert outcome == expected[name], name
