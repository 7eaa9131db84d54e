"""Renames and moves keep their captions with no model call; their outputs follow them.

Live (the watcher pairs the rename), across a restart (the start-up scan matches the new path
with the journal's row whose image is gone), a renamed directory, a copy, ``on_delete``, and a
move interrupted at each of its steps (``moves.MOVE_HOOKS`` plays the ``kill -9``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phicapd.pipeline import moves
from phicapd.pipeline.jobs import JobStore, State
from phicapd.pipeline.scanner import Reconciler
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

FORMATS = '[sidecar]\nformats = ["txt", "json", "jsonl"]\n'


def _manifest(directory: Path) -> dict[str, str]:
    lines = (directory / "metadata.jsonl").read_text().splitlines()
    return {e["file_name"]: e["text"] for e in map(json.loads, lines)}


def _done(daemon: object, path: Path) -> bool:
    job = daemon.store.get(path)  # type: ignore[attr-defined]
    return job is not None and job.state is State.DONE and is_settled(daemon)  # type: ignore[arg-type]


def _captioned(tmp_path: Path, root: Path, fake: FakeCaptioner, extra: str = FORMATS, n: int = 1) -> str:
    """Caption root/horse.png (and root/img{i}.png for more) in a first run; returns its caption."""
    settings = settings_for(tmp_path, [root], extra=extra)
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "horse.png", 1)
        for i in range(2, n + 1):
            write_unique_png(root / f"img{i}.png", i)
        wait_for(lambda: _done(daemon, root / "horse.png") and daemon.store.counts()["done"] == n, 30, "captions")
    return (root / "horse.txt").read_text().rstrip("\n")


def _assert_followed(root: Path, caption: str, edited: str) -> None:
    assert (root / "my horse.txt").read_text() == edited
    assert json.loads((root / "my horse.json").read_text())["caption"] == caption
    assert not (root / "horse.txt").exists() and not (root / "horse.json").exists()
    assert _manifest(root) == {"my horse.png": caption}


def test_a_live_rename_keeps_its_caption_and_its_hand_edited_txt_follows(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra=FORMATS)
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "horse.png", 1)
        wait_for(lambda: _done(daemon, root / "horse.png"), 30, "the first caption")
        caption = (root / "horse.txt").read_text().rstrip("\n")
        (root / "horse.txt").write_text("my own words\n")
        os.rename(root / "horse.png", root / "my horse.png")
        wait_for(lambda: _done(daemon, root / "my horse.png"), 30, "the rename to be seen")
        assert daemon.store.get(root / "horse.png") is None
    assert sum(fake.calls.values()) == 1
    _assert_followed(root, caption, "my own words\n")


def test_a_rename_while_the_daemon_was_down_costs_no_model_call(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    caption = _captioned(tmp_path, root, fake)
    (root / "horse.txt").write_text("edited while down\n")
    os.rename(root / "horse.png", root / "my horse.png")
    again = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], extra=FORMATS), again) as daemon:
        wait_for(lambda: _done(daemon, root / "my horse.png"), 30, "the catch-up scan")
        assert daemon.store.get(root / "horse.png") is None
    assert sum(again.calls.values()) == 0
    _assert_followed(root, caption, "edited while down\n")
