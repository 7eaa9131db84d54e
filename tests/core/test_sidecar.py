"""Sidecar naming (collision-free), the skip policy, and atomic writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from phicapd.outputs import atomic, freshness, naming


def test_naming_rule() -> None:
    d = Path("/d")
    assert naming.sidecar_for(d / "photo.jpg", ["photo.jpg"]) == d / "photo.txt"
    names = ["photo.png", "photo.jpg", "other.jpg"]
    assert naming.sidecar_for(d / "photo.jpg", names) == d / "photo.txt"  # sorts first: owns the plain name
    assert naming.sidecar_for(d / "photo.png", names) == d / "photo.png.txt"
    assert naming.sidecar_for(d / "other.jpg", names, ".caption") == d / "other.caption"
    targets = {naming.sidecar_for(d / n, names) for n in names}
    assert len(targets) == len(names)


def test_a_stem_that_names_another_image_cannot_take_its_sidecar() -> None:
    d = Path("/d")
    names = ["a.jpg", "a.png", "a.png.jpg"]
    # a.png is not the first of stem "a", so it takes a.png.txt; a.png.jpg (stem "a.png", alone)
    # would take a.png.txt too, and uses its full name instead.
    assert [naming.sidecar_for(d / n, names).name for n in names] == ["a.txt", "a.png.txt", "a.png.jpg.txt"]
    # Down a chain, each link follows the one below it.
    names = [*names, "a.png.jpg.gif"]
    assert naming.sidecar_for(d / "a.png.jpg.gif", names).name == "a.png.jpg.gif.txt"
    # Where a.png keeps the plain a.txt, nothing collides and a.png.jpg keeps a.png.txt.
    assert [naming.sidecar_for(d / n, ["a.png", "a.png.jpg"]).name for n in ["a.png", "a.png.jpg"]] == [
        "a.txt",
        "a.png.txt",
    ]


def test_up_to_date_means_non_empty_and_not_older(tmp_path: Path) -> None:
    image, side = tmp_path / "a.jpg", tmp_path / "a.txt"
    image.write_bytes(b"x")
    assert not freshness.is_up_to_date(image.stat(), side)
    side.write_text("caption\n")
    os.utime(image, ns=(1, 1_000_000_000))
    os.utime(side, ns=(1, 2_000_000_000))
    assert freshness.is_up_to_date(image.stat(), side)
    os.utime(image, ns=(1, 3_000_000_000))  # the image changed after its caption
    assert not freshness.is_up_to_date(image.stat(), side)
    side.write_text("")
    os.utime(side, ns=(1, 4_000_000_000))
    assert not freshness.is_up_to_date(image.stat(), side)


def test_an_image_stamped_in_the_future_is_up_to_date_once_captioned(tmp_path: Path) -> None:
    image, side = tmp_path / "a.jpg", tmp_path / "a.txt"
    image.write_bytes(b"x")
    future = time.time_ns() + 10 * 86400 * 10**9
    os.utime(image, ns=(future, future))  # cp -p from a clock that runs ahead
    copied = image.stat().st_ctime_ns
    side.write_text("caption\n")
    os.utime(side, ns=(copied, copied))  # captioned after the copy, long before its mtime
    assert freshness.is_up_to_date(image.stat(), side)
    os.utime(side, ns=(copied - 10**9, copied - 10**9))  # the copy replaced the bytes after this caption
    assert not freshness.is_up_to_date(image.stat(), side)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    atomic.write_sidecar(target, "new caption")
    assert target.read_text() == "new caption\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failed_write_keeps_old_file_and_cleans_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic.write_sidecar(target, "new")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".a.txt{atomic.TEMP_MARKER}999999999-abcd{atomic.TEMP_SUFFIX}"
    live = tmp_path / f".b.txt{atomic.TEMP_MARKER}{os.getpid()}-abcd{atomic.TEMP_SUFFIX}"
    dead.write_text("x")
    live.write_text("x")
    assert atomic.remove_stale_temps(tmp_path) == 1
    assert not dead.exists() and live.exists()


def test_sibling_cache_lists_once_until_a_foreign_change(tmp_path: Path) -> None:
    from phicapd.config import WatchRoot
    from phicapd.outputs.naming import SiblingCache
    from phicapd.pipeline.paths import list_images

    calls: list[Path] = []

    def counting(directory: Path, root: WatchRoot) -> list[str]:
        calls.append(directory)
        return list_images(directory, root)

    root = WatchRoot(path=tmp_path)
    (tmp_path / "photo.jpg").write_bytes(b"x")
    cache = SiblingCache(counting)
    assert cache.get(tmp_path, root).sidecar_for(tmp_path / "photo.jpg") == tmp_path / "photo.txt"
    unchanged = cache.unchanged(tmp_path)
    atomic.write_sidecar(tmp_path / "photo.txt", "ours")
    os.utime(tmp_path, ns=(1, 10**18))  # our write moved the directory's mtime
    cache.wrote(tmp_path, unchanged_before=unchanged)
    cache.get(tmp_path, root)
    assert len(calls) == 1  # our own sidecar did not force a new listing
    (tmp_path / "photo.bmp").write_bytes(b"x")  # a foreign image with the same stem, sorting first
    os.utime(tmp_path, ns=(1, 2 * 10**18))
    assert cache.get(tmp_path, root).sidecar_for(tmp_path / "photo.jpg") == tmp_path / "photo.jpg.txt"
    assert len(calls) == 2


def test_write_sidecars_keeps_an_existing_target_it_was_told_to_keep(tmp_path: Path) -> None:
    kept, fresh, replaced = tmp_path / "kept.txt", tmp_path / "fresh.txt", tmp_path / "replaced.txt"
    kept.write_text("by hand\n")
    replaced.write_text("old\n")
    errors = atomic.write_sidecars([(kept, "new"), (fresh, "new"), (replaced, "new")], keep={kept, fresh})
    assert isinstance(errors[0], FileExistsError) and errors[1:] == [None, None]
    assert kept.read_text() == "by hand\n"
    assert fresh.read_text() == "new\n" and replaced.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.txt", "kept.txt", "replaced.txt"]  # no temps


def test_the_rule_can_give_an_image_its_stem_its_name_or_name_dot_n() -> None:
    from phicapd.outputs.naming import is_rule_base

    assert is_rule_base("photo.jpg", "photo")
    assert is_rule_base("photo.jpg", "photo.jpg")
    assert is_rule_base("photo.jpg", "photo.jpg.2")
    assert is_rule_base("photo.jpg", "photo.jpg.12")
    for base in ("other", "photo.jpg.1", "photo.jpg.02", "photo.jpg.²", "photo.jpg.x", "photo.j", "photo.jpg.2.3"):
        assert not is_rule_base("photo.jpg", base), base
