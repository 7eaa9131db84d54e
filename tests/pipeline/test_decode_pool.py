"""The decode workers: they decode exactly as the daemon did in its own process, and a worker
that crashes or hangs on a file fails that image alone (``image_crashed_decoder``, retryable so
the journal counts the attempt) and is replaced for the next one."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from phicapd.config import ImagingSettings
from phicapd.errors import ImageError
from phicapd.pipeline import decode_buffer, decode_pool
from phicapd.pipeline.decode import read_image_file
from phicapd.pipeline.decode_pool import DecodeWorkers
from tests.support.fakes import unique_image, write_unique_png

CRASHING = Path(__file__).resolve().parents[1] / "support" / "crashing_decode_worker.py"


@pytest.fixture
def settings() -> ImagingSettings:
    return ImagingSettings(max_file_bytes=4 * 1024 * 1024, max_pixels=4_000_000)


@pytest.fixture
def workers(settings: ImagingSettings) -> DecodeWorkers:
    pool = DecodeWorkers(settings, 2, 1)
    yield pool
    pool.close()


def _crashing(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(decode_pool, "WORKER_COMMAND", [sys.executable, str(CRASHING), mode])


def test_a_worker_decodes_as_the_daemon_did_in_its_own_process(
    tmp_path: Path, workers: DecodeWorkers, settings: ImagingSettings
) -> None:
    photo = tmp_path / "photo.jpg"
    Image.effect_noise((640, 480), 60).convert("RGB").save(photo, quality=90)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the orientation tag: rotate when shown
    unique_image(5, (40, 30)).save(rotated, exif=exif)
    for path in (photo, rotated, tmp_path / "small.png"):
        if path.suffix == ".png":
            write_unique_png(path, 3)
        got, want = workers.decode_file(path), read_image_file(path, settings)
        assert (got.image.mode, got.image.size) == (want.image.mode, want.image.size)
        assert got.image.tobytes() == want.image.tobytes()
        assert (got.sha256, got.fingerprint) == (want.sha256, want.fingerprint)
    assert workers.decode_file(rotated).image.size == (30, 40)
    image = workers.decode_bytes(photo.read_bytes(), "upload.jpg")
    assert image.tobytes() == read_image_file(photo, settings).image.tobytes()


def test_what_a_worker_refuses_keeps_its_code(tmp_path: Path, workers: DecodeWorkers) -> None:
    text = tmp_path / "notes.png"
    text.write_bytes(b"not an image at all, " * 10)
    with pytest.raises(ImageError) as e:
        workers.decode_file(text)
    assert (e.value.code, e.value.retryable) == ("image_format_unsupported", False)
    assert str(text) in str(e.value)
    with pytest.raises(ImageError) as e:
        workers.decode_file(tmp_path / "gone.png")
    assert e.value.code == "image_missing"
    with pytest.raises(ImageError) as e:
        workers.decode_bytes(b"x" * (4 * 1024 * 1024 + 1), "big.png")  # refused before it is sent
    assert e.value.code == "image_too_large"
    assert workers.died == 0


@pytest.mark.parametrize("mode", ["abort", "hang"])
def test_a_worker_that_crashes_or_hangs_fails_that_image_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: ImagingSettings, mode: str
) -> None:
    _crashing(monkeypatch, mode)
    hostile = tmp_path / "hostile.png"
    write_unique_png(hostile, 1)
    innocent = [tmp_path / f"img{i}.png" for i in range(6)]
    for i, path in enumerate(innocent):
        write_unique_png(path, 10 + i)
    pool = DecodeWorkers(settings, 2, 1)
    try:
        for path in innocent[:2]:  # each worker answers once: started and imported
            pool.decode_file(path)
        monkeypatch.setattr(decode_pool, "TIMEOUT_SECONDS", 1.0)
        results: dict[str, object] = {}

        def decode(path: Path) -> None:
            try:
                results[path.name] = pool.decode_file(path).sha256
            except ImageError as e:
                results[path.name] = e

        # The hostile one beside the others, in two workers at once.
        threads = [threading.Thread(target=decode, args=(p,)) for p in (innocent[0], hostile, *innocent[1:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        error = results.pop("hostile.png")
        assert isinstance(error, ImageError)
        assert (error.code, error.retryable) == ("image_crashed_decoder", True)
        assert str(hostile) in str(error)
        assert ("killed by SIGABRT" if mode == "abort" else "gave no answer within 1 s") in str(error)
        assert results == {p.name: read_image_file(p, settings).sha256 for p in innocent}
        assert pool.died == 1
        with pytest.raises(ImageError) as e:  # an upload that crashes its worker: the same code
            pool.decode_bytes(hostile.read_bytes(), "hostile.png")
        assert e.value.code == "image_crashed_decoder"
        assert pool.decode_bytes(innocent[0].read_bytes(), "again.png").size == (8, 8)  # replaced
    finally:
        pool.close()


def test_a_huge_image_does_not_keep_its_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: DecodeWorkers
) -> None:
    monkeypatch.setattr(decode_buffer, "KEEP_BYTES", 64 * 1024)
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300), (1, 2, 3)).save(path)
    assert workers.decode_file(path).image.getpixel((299, 299)) == (1, 2, 3)
    buffers = [w.pixels for w in workers._background.all]
    assert all(os.fstat(b.fd).st_size == 0 for b in buffers)  # 270 KB of pixels, given back
    assert workers.decode_file(path).image.size == (300, 300)  # and grown again when needed


def test_a_100_megapixel_photo_decodes_in_a_worker_when_max_pixels_allows_it(tmp_path: Path) -> None:
    """Pillow's own guard (89.5 MP by default) is lifted in the worker process to the setting."""
    photo = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 200).save(photo)  # one colour: a few hundred KB
    pool = DecodeWorkers(ImagingSettings(max_pixels=120_000_000), 1, 1)
    try:
        decoded = pool.decode_file(photo)
        assert decoded.image.size == (10_000, 10_000)
        assert decoded.image.getpixel((9_999, 9_999)) == (200, 200, 200)
    finally:
        pool.close()
    pool = DecodeWorkers(ImagingSettings(), 1, 1)
    try:
        with pytest.raises(ImageError) as refused:
            pool.decode_file(photo)
    finally:
        pool.close()
    assert refused.value.code == "image_bomb"
    assert "exceeds the limit of 64000000 pixels ([imaging] max_pixels)" in str(refused.value)
