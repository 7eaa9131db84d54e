"""Renames and moves keep their captions with no model call; their outputs follow them.

Live (the watcher pairs the rename), across a restart (the start-up scan matches the new path
with the journal's row whose image is gone), a renamed directory, a copy, ``on_delete``, and a
move interrupted at each of its steps (``moves.MOVE_HOOKS`` plays the ``kill -9``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from phicapd.pipeline import moves
from phicapd.pipeline.journal import Journal, State
from phicapd.pipeline.reconciler import Reconciler
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


@pytest.mark.parametrize("policy", ["overwrite", "skip"])
@pytest.mark.parametrize("live", [True, False], ids=["live", "while-down"])
def test_a_renamed_directory_takes_its_journal_along(tmp_path: Path, live: bool, policy: str) -> None:
    # Under "overwrite" only the journal tells phicapd's own outputs from others': without its rows
    # the renamed directory's images would all go back to the model. Under "skip" nothing is
    # captioned again either way, but without its rows `stale` would no longer know them.
    root = tmp_path / "photos"
    (root / "album").mkdir(parents=True)
    extra = FORMATS + f'existing = "{policy}"\n'
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra=extra)
    with running_daemon(settings, fake) as daemon:
        for i in range(3):
            write_unique_png(root / "album" / f"img{i}.png", i)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "captions")
        (root / "album" / "img0.txt").write_text("edited\n")
        if live:
            os.rename(root / "album", root / "trip")
            wait_for(lambda: _done(daemon, root / "trip" / "img2.png"), 30, "the renamed directory")
            daemon.api.rescan()
            wait_for(lambda: daemon.intake.scans_done >= 3 and is_settled(daemon), 30, "a rescan")
    if not live:
        os.rename(root / "album", root / "trip")
    again = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], extra=extra), again) as daemon:
        wait_for(lambda: _done(daemon, root / "trip" / "img2.png"), 30, "the catch-up scan")
        assert [daemon.store.get(root / "album" / f"img{i}.png") for i in range(3)] == [None] * 3
        moved = {j.path.name for j in daemon.store.captioned(root, root / "trip")}
    assert moved == {"img0.png", "img1.png", "img2.png"}
    assert sum(fake.calls.values()) == 3 and sum(again.calls.values()) == 0
    assert (root / "trip" / "img0.txt").read_text() == "edited\n"
    assert set(_manifest(root / "trip")) == {"img0.png", "img1.png", "img2.png"}


def test_a_copy_is_served_from_the_journal_when_its_settings_match(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra=FORMATS)
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "horse.png", 1)
        wait_for(lambda: _done(daemon, root / "horse.png"), 30, "the first caption")
        caption = (root / "horse.txt").read_text()
        (root / "copy.png").write_bytes((root / "horse.png").read_bytes())
        wait_for(lambda: _done(daemon, root / "copy.png") and (root / "copy.txt").exists(), 30, "the copy")
    assert sum(fake.calls.values()) == 1
    assert (root / "copy.txt").read_text() == caption == (root / "horse.txt").read_text()
    assert _manifest(root) == {"copy.png": caption.rstrip("\n"), "horse.png": caption.rstrip("\n")}


@pytest.mark.parametrize("policy", ["keep", "remove"])
def test_on_delete_keeps_or_removes_only_unedited_outputs(
    tmp_path: Path, policy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [], extra=FORMATS + f'[[watch]]\npath = "{root}"\non_delete = "{policy}"\n')
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "horse.png", 1)
        write_unique_png(root / "cow.png", 2)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 2, 30, "captions")
        (root / "horse.txt").write_text("edited by hand\n")
        (root / "horse.png").unlink()
        (root / "cow.png").rename(tmp_path / "cow.png")  # out of every root: as good as deleted
        wait_for(lambda: daemon.store.counts()["done"] == 0 and is_settled(daemon), 30, "the deletions")
        assert main(["--socket", str(tmp_path / "none.sock"), "orphans", str(root)]) == 0
        # A different image under a deleted one's name is captioned, not taken for its old caption.
        write_unique_png(root / "cow.png", 3)
        wait_for(lambda: _done(daemon, root / "cow.png"), 30, "the new cow")
    assert sum(fake.calls.values()) == 3 and len(fake.calls) == 3
    kept = policy == "keep"
    assert (root / "horse.txt").read_text() == "edited by hand\n"
    assert (root / "horse.json").exists() == kept
    names = ["cow.json", "cow.txt", "horse.json", "horse.txt"] if kept else ["horse.txt"]
    assert capsys.readouterr().out.splitlines() == [str(root / n) for n in names]
    assert json.loads((root / "cow.json").read_text())["caption"] == (root / "cow.txt").read_text().rstrip("\n")
    assert _manifest(root) == {"cow.png": (root / "cow.txt").read_text().rstrip("\n")}


class _Killed(BaseException):
    """A ``kill -9`` at one step of a move: nothing after it runs, no handler sees it."""


@pytest.mark.parametrize("step", [("output", 2), ("manifest", 1), ("journal", 1), ("linked", 0)])
def test_a_move_interrupted_at_any_step_finishes_at_the_next_start_without_the_model(
    tmp_path: Path, step: tuple[str, int]
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    caption = _captioned(tmp_path, root, fake)
    (root / "horse.txt").write_text("edited\n")
    os.rename(root / "horse.png", root / "my horse.png")
    settings = settings_for(tmp_path, [root], extra=FORMATS)
    name, nth = step
    if name == "linked":  # link-then-unlink (a filesystem without RENAME_NOREPLACE) cut in between
        os.link(root / "horse.txt", root / "my horse.txt")
    else:
        calls: list[str] = []

        def kill(at: str, path: Path) -> None:
            calls.append(at)
            if at == name and calls.count(name) == nth:
                raise _Killed

        moves.MOVE_HOOKS.append(kill)
        store = Journal(settings.state.dir / "journal.sqlite3")
        try:
            with pytest.raises(_Killed):
                Reconciler(settings, store).scan(settings.watch[0], reason="startup")
        finally:
            store.close()
            moves.MOVE_HOOKS.clear()
        assert (root / "my horse.txt").exists() == (name != "output" or nth > 1)
    again = FakeCaptioner()
    with running_daemon(settings, again) as daemon:
        wait_for(lambda: _done(daemon, root / "my horse.png"), 30, "the move to finish")
        assert daemon.store.get(root / "horse.png") is None
    assert sum(again.calls.values()) == 0
    _assert_followed(root, caption, "edited\n")


def test_a_move_between_roots_takes_what_the_new_root_writes(tmp_path: Path) -> None:
    # One root writes txt and json, the other txt and the manifest: the .txt (edited) moves, the
    # .json stays behind (the other root writes none), the manifest entry is written from the
    # journal's caption; no model call, live and across a restart.
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    extra = (
        f'[[watch]]\npath = "{first}"\nformats = ["txt", "json"]\n'
        f'[[watch]]\npath = "{second}"\nformats = ["txt", "jsonl"]\n'
    )
    fake = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [], extra=extra), fake) as daemon:
        write_unique_png(first / "horse.png", 1)
        write_unique_png(first / "cow.png", 2)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 2, 30, "captions")
        captions = {n: (first / f"{n}.txt").read_text() for n in ("horse", "cow")}
        (first / "horse.txt").write_text("edited\n")
        os.rename(first / "horse.png", second / "horse.png")
        wait_for(lambda: _done(daemon, second / "horse.png") and daemon.store.get(first / "horse.png") is None, 30, "")
    os.rename(first / "cow.png", second / "cow.png")
    again = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [], extra=extra), again) as daemon:
        wait_for(lambda: _done(daemon, second / "cow.png"), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 2 and sum(again.calls.values()) == 0
    assert (second / "horse.txt").read_text() == "edited\n"
    assert (second / "cow.txt").read_text() == captions["cow"]
    assert sorted(p.name for p in first.iterdir()) == ["cow.json", "horse.json"]
    assert _manifest(second) == {"cow.png": captions["cow"].rstrip("\n"), "horse.png": captions["horse"].rstrip("\n")}


def test_an_output_never_replaces_a_file_at_its_new_name_nor_follows_a_link(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    fake = FakeCaptioner()
    caption = _captioned(tmp_path, root, fake)
    (root / "cow.txt").write_text("someone else's\n")  # stands where horse.txt would go
    (root / "horse.json").unlink()
    (root / "elsewhere.json").write_text(json.dumps({"caption": "not to be moved"}))
    (root / "horse.json").symlink_to(root / "elsewhere.json")
    os.rename(root / "horse.png", root / "cow.png")
    again = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], extra=FORMATS), again) as daemon:
        wait_for(lambda: _done(daemon, root / "cow.png"), 30, "the catch-up scan")
    assert sum(again.calls.values()) == 0
    assert (root / "cow.txt").read_text() == "someone else's\n"
    assert (root / "horse.txt").read_text() == caption + "\n"
    assert (root / "horse.json").is_symlink()
    # The json was written from the journal's caption (a backfill), not taken through the link.
    assert json.loads((root / "cow.json").read_text())["caption"] == caption
    assert _manifest(root) == {"cow.png": caption}


def test_a_renamed_images_xmp_sidecar_follows_it_under_full_naming(tmp_path: Path) -> None:
    pytest.importorskip("pyexiv2")
    from phicapd.outputs import metadata

    root = tmp_path / "photos"
    root.mkdir()
    extra = '[sidecar]\nformats = ["xmp"]\nxmp_naming = "full"\n'
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra=extra)
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "horse.png", 1)
        wait_for(lambda: _done(daemon, root / "horse.png"), 30, "the first caption")
    caption = metadata.read_description(root / "horse.png.xmp")
    os.rename(root / "horse.png", root / "my horse.png")
    again = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], extra=extra), again) as daemon:
        wait_for(lambda: _done(daemon, root / "my horse.png"), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 1 and sum(again.calls.values()) == 0
    assert not (root / "horse.png.xmp").exists()
    assert caption and metadata.read_description(root / "my horse.png.xmp") == caption
