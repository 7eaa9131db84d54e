"""``phicapctl orphans [DIR]``: outputs whose image is gone, listed from the files alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from tests.support.daemon import write_config


def _tree(top: Path) -> None:
    top.mkdir()
    for name in ("a.png", "a.txt", "gone.txt", "gone.xmp", "raw.CR2", "raw.xmp", "b.jpg", "b.png", "b.png.txt"):
        (top / name).write_bytes(b"x")
    (top / "b.jpg.2.txt").write_bytes(b"x")  # a name.N base: b.jpg owns it
    (top / "c.jpg.xmp").write_bytes(b"x")  # full xmp naming, image gone
    (top / "d.json").write_text(json.dumps({"caption": "ours", "phicapd_version": "1"}))
    (top / "takeout.jpg.json").write_text(json.dumps({"title": "someone else's"}))
    (top / "metadata.jsonl").write_text("")
    (top / os.fsdecode(b"bad\xffname.txt")).write_bytes(b"x")
    (top / "sub").mkdir()
    (top / "sub" / "e.txt").write_bytes(b"x")


def test_orphans_lists_outputs_whose_image_is_gone_one_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top = tmp_path / "photos"
    _tree(top)
    assert main(["--socket", str(tmp_path / "none.sock"), "orphans", str(top)]) == 0
    listed = capsys.readouterr().out.splitlines()
    names = ["bad\\xffname.txt", "c.jpg.xmp", "d.json", "gone.txt", "gone.xmp", "sub/e.txt"]
    assert listed == [f"{top}/{n}" for n in names]


def test_orphans_without_dir_looks_through_every_root_of_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "x.caption").write_bytes(b"x")
    (first / "notes.txt").write_bytes(b"x")  # no output where the extension is .caption
    (second / "y.json").write_text(json.dumps({"caption": "y"}))
    config = write_config(tmp_path, [first, second], extra='[sidecar]\nextension = ".caption"\n')
    assert main(["--config", str(config), "orphans"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(first / "x.caption"), str(second / "y.json")]


def test_orphans_without_dir_or_config_says_what_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PHICAPD_CONFIG", raising=False)
    monkeypatch.setattr("phicapd.cli.orphans.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert main(["--socket", str(tmp_path / "none.sock"), "orphans"]) == 66
    assert "name a DIR" in capsys.readouterr().err
