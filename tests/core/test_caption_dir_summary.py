"""``phicapctl caption-dir`` ends its stderr with ``N captioned, M skipped, K failed in S s``
(scripts parse it), shows a bar on a terminal and plain lines elsewhere. Here through the real
daemon, decoder included, with the fake model."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from tests.support.daemon import running_daemon, settings_for

SUMMARY = re.compile(r"^(\d+) captioned, (\d+) skipped, (\d+) failed in \d+\.\d s$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _album(tmp_path: Path, photos: Path) -> Path:
    album = tmp_path / "album"
    album.mkdir()
    for name in ("chelsea.png", "rocket.jpg"):
        shutil.copy(photos / name, album / name)
    (album / "junk.jpg").write_bytes(b"this is not a JPEG, whatever its name says\n" * 20)
    return album


def test_two_photos_and_one_junk_file(tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    album = _album(tmp_path, photos)
    settings = settings_for(tmp_path, [])
    with running_daemon(settings):
        socket = str(settings.control.socket)
        assert main(["--socket", socket, "caption-dir", str(album)]) == 65  # the junk file: rejected input
        first = capsys.readouterr().err.splitlines()
        assert main(["--socket", socket, "caption-dir", str(album)]) == 65  # again: photos are up to date
        again = capsys.readouterr().err.splitlines()
    assert SUMMARY.match(first[-1]), first
    assert first[-1].startswith("2 captioned, 0 skipped, 1 failed in ")
    assert any(line.startswith(f"phicapctl: {album / 'junk.jpg'}: ") for line in first[:-1])
    assert again[-1].startswith("0 captioned, 2 skipped, 1 failed in ")
    assert sum("skipped, the existing-sidecar policy keeps" in line for line in again) == 2  # plain lines
    assert (album / "chelsea.txt").exists() and (album / "rocket.txt").exists()


def test_a_terminal_gets_a_bar_and_the_summary_last(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    album = _album(tmp_path, photos)
    (album / "junk.jpg").unlink()
    settings = settings_for(tmp_path, [])
    with running_daemon(settings):
        socket = str(settings.control.socket)
        assert main(["--socket", socket, "caption-dir", str(album)]) == 0
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        assert main(["--socket", socket, "caption-dir", str(album)]) == 0
    out = terminal.getvalue()
    assert "[########################] 2/2 done, 2 skipped, 0 failed" in out
    assert "existing-sidecar policy" not in out  # the bar counts them
    assert SUMMARY.match(out.split("\r\x1b[K")[-1].rstrip("\n"))
    assert out.endswith("\n") and out.split("\r\x1b[K")[-1].startswith("0 captioned, 2 skipped, 0 failed in ")


def test_an_empty_directory_still_ends_with_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(tmp_path, [])
    (tmp_path / "nothing").mkdir()
    with running_daemon(settings):
        assert main(["--socket", str(settings.control.socket), "caption-dir", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().err.splitlines()[-1].startswith("0 captioned, 0 skipped, 0 failed in ")
