"""File names are bytes: any name Linux allows is captioned, by the scans, the watcher and
phicapctl, or fails with a code for the one output that cannot hold it (``phicapd.fsnames``)."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from phicapd.cli.ctl import main as phicapctl
from phicapd.errors import NAME_NOT_UTF8
from phicapd.outputs.formats.jsonl import read_manifest
from phicapd.pipeline.journal import State
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

NOT_UTF8 = os.fsdecode(b"bad\xffname.png")
ODD = [
    NOT_UTF8,
    "new\nline.png",
    "-dash.png",
    unicodedata.normalize("NFC", "café.png"),
    unicodedata.normalize("NFD", "café.png"),
    "x" * 251 + ".png",  # 255 bytes, the longest name
]


def _config(root: Path) -> str:
    return f'[[watch]]\npath = "{root}"\nformats = ["txt", "jsonl"]\n'


def _txt(image: Path) -> Path:
    return image.with_name(image.name.rsplit(".", 1)[0] + ".txt")


def test_catch_up_of_a_root_with_odd_names_captions_every_image(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [], extra=_config(root))
    fake = FakeCaptioner()
    write_unique_png(root / "first.png", 0)
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and _txt(root / "first.png").exists(), 15, "the first caption")
    # Arrived while the daemon was down: odd names beside normal ones, one in a new subdirectory.
    normal = [root / "b.png", root / "sub" / "c.png"]
    (root / "sub").mkdir()
    for i, image in enumerate(normal + [root / name for name in ODD], start=1):
        write_unique_png(image, i)
    old = os.path.getmtime(root / "b.png") - 60  # settled already: the catch-up queues them
    for image in root.rglob("*.png"):
        os.utime(image, (old, old))
    with running_daemon(settings, fake) as daemon:
        wait_for(
            lambda: is_settled(daemon) and all(_txt(root / n).exists() for n in ODD) and _txt(normal[1]).exists(),
            15,
            "every image captioned",
        )
        bad = daemon.store.get(root / NOT_UTF8)
        ok = [daemon.store.get(root / n) for n in ODD[1:]] + [daemon.store.get(p) for p in normal]
    err = capsys.readouterr().err
    assert "scan failed" not in err and "Traceback" not in err and "cannot record" not in err
    assert all(_txt(p).read_text().startswith("A 8x8 test image") for p in normal)
    assert all(job is not None and job.state is State.DONE for job in ok)
    # Its txt is written; metadata.jsonl's text file_name cannot hold it: that output fails by code.
    assert bad is not None and bad.state is State.FAILED and bad.error_code == NAME_NOT_UTF8
    assert "bad\\xffname.png" in (bad.error_message or "")
    assert set(read_manifest(root)) == {"first.png", "b.png", *ODD[1:]}
    assert sum(fake.calls.values()) == 3 + len(ODD)  # each image once


def test_odd_names_moved_in_together_are_all_captioned(tmp_path: Path, capsys) -> None:
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    settings = settings_for(tmp_path, [root])
    names = [*ODD, "plain.png"]
    for i, name in enumerate(names):
        write_unique_png(outside / name, i)
    with running_daemon(settings) as daemon:
        for name in names:
            os.rename(outside / name, root / name)
        wait_for(lambda: is_settled(daemon) and all(_txt(root / n).exists() for n in names), 15, "every caption")
    assert "cannot record settled files" not in capsys.readouterr().err


def test_caption_file_and_caption_dir_on_odd_names(tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    settings = settings_for(tmp_path, [])
    for i, name in enumerate(ODD):
        write_unique_png(photos / name, i)
    socket = str(settings.control.socket)
    with running_daemon(settings):
        capsys.readouterr()
        assert (
            phicapctl(["--socket", socket, "caption-file", "--", str(photos / NOT_UTF8), str(photos / "-dash.png")])
            == 0
        )
        out = capsys.readouterr().out
        assert out.count("A 8x8 test image") == 2
        # Printed for people: the byte that is not UTF-8 as \xff; the sidecar holds the caption.
        first = out.splitlines()[0]
        assert first.startswith(f"{photos}/bad\\xffname.png: ")
        assert _txt(photos / NOT_UTF8).read_text() == first.split(": ", 1)[1] + "\n"
        assert phicapctl(["--socket", socket, "caption-dir", str(photos)]) == 0
        captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert all(_txt(photos / n).read_text().startswith("A 8x8 test image") for n in ODD)


def test_failures_and_status_list_an_odd_name_without_a_traceback(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / NOT_UTF8, 1)
    settings = settings_for(tmp_path, [], extra=_config(root))
    socket = str(settings.control.socket)
    with running_daemon(settings) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["failed"] == 1, 15, "the parked image")
        capsys.readouterr()
        assert phicapctl(["--socket", socket, "failures"]) == 0
        assert f"{root}/bad\\udcffname.png  {NAME_NOT_UTF8}" in capsys.readouterr().out
        assert phicapctl(["--socket", socket, "status"]) == 0
        assert f"{NAME_NOT_UTF8}" in capsys.readouterr().out
        assert phicapctl(["--socket", socket, "retry", "--", str(root / NOT_UTF8)]) == 0
        assert "re-queued 1" in capsys.readouterr().out


def test_one_entry_that_cannot_be_judged_does_not_stop_the_scan(tmp_path: Path, monkeypatch, capsys) -> None:
    from phicapd.pipeline import reconciler

    real = reconciler.sidecar_base

    def refuse_one(path: Path) -> str:
        if path.name == "broken.png":
            raise RuntimeError("cannot judge this one")
        return real(path)

    monkeypatch.setattr(reconciler, "sidecar_base", refuse_one)
    root = tmp_path / "in"
    root.mkdir()
    for i, name in enumerate(["a.png", "broken.png", "z.png"]):
        write_unique_png(root / name, i)
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings) as daemon:
        wait_for(lambda: is_settled(daemon) and _txt(root / "z.png").exists(), 15, "the scan to go on")
        assert _txt(root / "a.png").exists() and not _txt(root / "broken.png").exists()
        assert daemon.api.status()["scan_failed"] == []
    err = capsys.readouterr().err
    assert "cannot check image" in err and "broken.png" in err and "scan failed" not in err


def test_a_failed_scan_shows_in_status_until_a_scan_succeeds(tmp_path: Path, monkeypatch, capsys) -> None:
    from phicapd.pipeline.reconciler import Reconciler

    real = Reconciler.scan
    broken = {"on": True}

    def scan(self: Reconciler, root, directory=None, reason="scan"):  # type: ignore[no-untyped-def]
        if broken["on"]:
            raise OSError("the share went away")
        return real(self, root, directory, reason)

    monkeypatch.setattr(Reconciler, "scan", scan)
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root])
    socket = str(settings.control.socket)
    with running_daemon(settings) as daemon:
        wait_for(lambda: daemon.api.status()["scan_failed"] != [], 15, "the failed start-up scan in status")
        [failed] = daemon.api.status()["scan_failed"]
        assert failed["root"] == str(root) and failed["reason"] == "startup"
        assert failed["error"] == "OSError: the share went away" and failed["at"] > 0
        capsys.readouterr()
        assert phicapctl(["--socket", socket, "status"]) == 0
        assert "the share went away" in capsys.readouterr().out
        broken["on"] = False
        assert phicapctl(["--socket", socket, "rescan"]) == 0
        wait_for(lambda: daemon.api.status()["scan_failed"] == [], 15, "a good scan to clear it")
