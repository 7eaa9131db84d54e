"""HEIC/HEIF/AVIF join a root's default ``include`` where a decoder for them is installed, and a
root holding image files no installed decoder reads (raw files without rawpy, HEIC without
pillow-heif) says so: once in the log, and in ``phicapctl status`` (count, by extension, one
example path). Raw files with rawpy: tests/core/test_raw_photos.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from phicapd import image_types
from phicapd.cli.ctl import main
from phicapd.config import load_settings
from phicapd.pipeline import unreadable
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


@pytest.fixture
def warnings_logged(monkeypatch: pytest.MonkeyPatch) -> _Log:
    fake = _Log()
    monkeypatch.setattr(unreadable, "log", fake)
    return fake


def _heif(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(image_types, "heif_available", lambda: available)


@pytest.fixture(autouse=True)
def _no_rawpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """As without rawpy installed: no decoder reads the raw files here."""
    monkeypatch.setattr(image_types, "raw_available", lambda: False)


@pytest.mark.parametrize("heif", [True, False])
def test_the_default_include_takes_heic_only_where_pillow_heif_is_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heif: bool
) -> None:
    _heif(monkeypatch, heif)
    config = tmp_path / "c.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "s"}"\n[[watch]]\npath = "{tmp_path}"\n')
    include = load_settings(config).watch[0].include
    assert ("*.heic" in include, "*.heif" in include) == (heif, heif)
    assert "*.jpg" in include and "*.cr2" not in include
    assert ("*.avif" in include) == image_types.avif_available()
    assert (".heic" in image_types.unreadable_extensions()) is not heif
    assert ".cr2" in image_types.unreadable_extensions()


def _tree(root: Path) -> None:
    write_unique_png(root / "photo.png", 1)
    (root / "raw").mkdir()
    (root / "raw" / "IMG_0001.CR2").write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00")
    (root / "raw" / "DSC_0002.nef").write_bytes(b"MM\x00*")
    (root / "raw" / ".hidden.nef").write_bytes(b"MM\x00*")  # hidden: never counted
    (root / "ignored.dng").write_bytes(b"II*\x00")  # the root's ignore names it: not counted
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")  # not an image: not counted


def test_a_root_with_raw_and_heic_files_without_a_decoder_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_logged: _Log, capsys
) -> None:
    _heif(monkeypatch, False)
    root = tmp_path / "in"
    root.mkdir()
    _tree(root)
    (root / "IMG_0003.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    settings = settings_for(tmp_path, [root], extra='ignore = ["*.dng"]\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 1, 30, "the png's caption")
        daemon.api.rescan()
        wait_for(lambda: daemon.intake.scans_done >= 2 and is_settled(daemon), 30, "the rescan")
        [entry] = daemon.api.status()["unreadable"]
        assert main(["--socket", str(settings.control.socket), "status"]) == 0
    assert sum(fake.calls.values()) == 1
    assert entry["root"] == str(root) and entry["files"] == 3
    assert entry["by_extension"] == {".cr2": 1, ".heic": 1, ".nef": 1}
    counted = [root / "IMG_0003.HEIC", root / "raw" / "IMG_0001.CR2", root / "raw" / "DSC_0002.nef"]
    assert entry["example"] in map(str, counted)
    [(event, fields)] = warnings_logged.warnings  # once, though the root was scanned twice
    assert "no installed decoder reads" in event and fields["root"] == str(root) and fields["files"] == 3
    out = capsys.readouterr().out
    assert "unreadable" in out and entry["example"] in out


def test_heic_is_captioned_where_pillow_heif_is_installed(tmp_path: Path, warnings_logged: _Log) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="needs pillow-heif (pip install 'phicapd[heic]')")
    root = tmp_path / "in"
    root.mkdir()
    _tree(root)
    pillow_heif.register_heif_opener()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(root / "IMG_0003.HEIC", format="HEIF")
    settings = settings_for(tmp_path, [root], extra='ignore = ["*.dng"]\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 2, 30, "two captions")
        [entry] = daemon.api.status()["unreadable"]
    assert (root / "IMG_0003.txt").exists() and os.path.getsize(root / "IMG_0003.txt") > 0
    assert entry["files"] == 2 and entry["by_extension"] == {".cr2": 1, ".nef": 1}
    assert len(warnings_logged.warnings) == 1
