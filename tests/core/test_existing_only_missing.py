"""The ``only-missing`` policy in the daemon: a sidecar that exists is never replaced, whatever
its age, at the start-up catch-up and on a watcher event (the image is not even queued), nor
when it appears while the image's job waits; only images without one are captioned, and a
forced retry or ``phicapctl caption-file --force`` still captions and replaces.

The kept sidecars have a twin under ``skip`` (another root of the same daemon), where the same older
sidecar is replaced: the sidecars below are stale, not merely present."""

from __future__ import annotations

import os
import time
from pathlib import Path

from phicapd.cli.ctl import main
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

HAND = "Kept by hand.\n"


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), "caption-file", *args])


def _older_sidecar(image: Path) -> Path:
    """A hand-written sidecar an hour older than ``image``: stale under ``skip``."""
    sidecar = image.with_suffix(".txt")
    sidecar.write_text(HAND)
    then = image.stat().st_mtime - 3600
    os.utime(sidecar, (then, then))
    return sidecar


def _roots(tmp_path: Path) -> tuple[Path, Path, str]:
    """A root under the global ``only-missing`` and one that sets ``skip`` for itself."""
    kept, skip = tmp_path / "kept", tmp_path / "skip"
    kept.mkdir()
    skip.mkdir()
    extra = (
        f'[sidecar]\nexisting = "only-missing"\n[[watch]]\npath = "{kept}"\n'
        f'[[watch]]\npath = "{skip}"\nexisting = "skip"\n'
    )
    return kept, skip, extra


def test_catch_up_and_rewrites_keep_an_older_sidecar(tmp_path: Path) -> None:
    kept, skip, extra = _roots(tmp_path)
    old = time.time() - 7200
    keys: dict[Path, str] = {}
    for n, root in enumerate((kept, skip)):
        for i, name in enumerate(("edited", "bare")):
            image = root / f"{name}.png"
            keys[image] = write_unique_png(image, 10 * n + i)
            os.utime(image, (old, old))
        _older_sidecar(root / "edited.png")
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [], extra=extra)
    with running_daemon(settings, fake) as daemon:
        wait_for(
            lambda: is_settled(daemon) and (kept / "bare.txt").exists() and (skip / "bare.txt").exists(),
            30,
            "the catch-up scan",
        )
        assert (kept / "edited.txt").read_text() == HAND  # only-missing: kept though older
        assert (skip / "edited.txt").read_text() != HAND  # skip: captioned again
        assert fake.calls[keys[kept / "edited.png"]] == 0
        assert daemon.store.get(kept / "edited.png") is None  # not even queued
        assert fake.calls[keys[kept / "bare.png"]] == 1

        # The image is saved again (new pixels): the watcher sees it, its sidecar is older still.
        _older_sidecar(skip / "edited.png")
        rewritten = {root: write_unique_png(root / "edited.png", 100 + n) for n, root in enumerate((kept, skip))}
        new = {root: write_unique_png(root / "new.png", 200 + n) for n, root in enumerate((kept, skip))}
        wait_for(
            lambda: is_settled(daemon) and (kept / "new.txt").exists() and (skip / "new.txt").exists(),
            30,
            "the new images",
        )
        wait_for(lambda: is_settled(daemon) and fake.calls[rewritten[skip]] == 1, 30, "the skip root's rewrite")
        job = daemon.store.get(kept / "edited.png")
    assert (kept / "edited.txt").read_text() == HAND
    assert fake.calls[rewritten[kept]] == 0 and job is None
    assert (skip / "edited.txt").read_text() != HAND
    assert fake.calls[new[kept]] == 1 and fake.calls[new[skip]] == 1


def test_a_queued_jobs_older_sidecar_that_appeared_meanwhile_is_kept(tmp_path: Path) -> None:
    kept, skip, extra = _roots(tmp_path)
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [], extra=extra)
    with running_daemon(settings, fake) as daemon:
        daemon.scheduler.pause()
        keys = {root: write_unique_png(root / "a.png", n) for n, root in enumerate((kept, skip))}
        wait_for(lambda: daemon.store.counts()["pending"] == 2, 30, "both images to be queued")
        # While the jobs wait, a caption arrives another way, dated before the image (restored
        # from a backup, copied with its mtime).
        sidecars = {root: _older_sidecar(root / "a.png") for root in (kept, skip)}
        daemon.scheduler.resume()
        wait_for(lambda: is_settled(daemon), 30, "the queue to drain")
        states = {root: daemon.store.get(root / "a.png").state.value for root in (kept, skip)}
    assert sidecars[kept].read_text() == HAND and fake.calls[keys[kept]] == 0
    assert sidecars[skip].read_text() != HAND and fake.calls[keys[skip]] == 1
    assert states == {kept: "done", skip: "done"}


def test_a_forced_retry_replaces_the_sidecar(tmp_path: Path) -> None:
    kept, _skip, extra = _roots(tmp_path)
    image = kept / "a.png"
    key = write_unique_png(tmp_path / "a.png", 1)  # the key of the pixels, before the daemon runs
    fake = FakeCaptioner(fail_keys={key})
    settings = settings_for(tmp_path, [], extra=extra)
    with running_daemon(settings, fake) as daemon:
        os.replace(tmp_path / "a.png", image)
        wait_for(lambda: daemon.store.counts()["failed"] == 1, 60, "the image to fail and be parked")
        sidecar = kept / "a.txt"
        sidecar.write_text(HAND)  # written while it was parked
        fake.fail_keys.clear()
        assert daemon.api.retry(None) == 1
        wait_for(lambda: is_settled(daemon) and sidecar.read_text() != HAND, 30, "the forced retry")
        state = daemon.store.get(image).state.value
    assert fake.calls[key] == 1 and state == "done"
    assert sidecar.read_text().startswith("A 8x8 test image")


def test_phicapctl_keeps_an_older_sidecar_unless_forced(tmp_path: Path, capsys) -> None:
    kept, skip, extra = _roots(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # outside every root: the global only-missing
    elsewhere.mkdir()
    settings = settings_for(tmp_path, [], extra=extra)
    with running_daemon(settings) as daemon:
        daemon.api.pause()  # the watcher stays out of it
        photos = {d: d / "photo.png" for d in (kept, skip, elsewhere)}
        for n, photo in enumerate(photos.values()):
            write_unique_png(photo, n)
        sidecars = {d: _older_sidecar(photo) for d, photo in photos.items()}
        bare = kept / "bare.png"
        write_unique_png(bare, 9)

        assert _ctl(settings.control.socket, *map(str, photos.values()), str(bare)) == 0

        err = capsys.readouterr().err
        assert sidecars[kept].read_text() == HAND and sidecars[elsewhere].read_text() == HAND
        assert f"{photos[kept]}: skipped" in err and f"{photos[elsewhere]}: skipped" in err
        assert sidecars[skip].read_text().startswith("A 8x8 test image")
        assert (kept / "bare.txt").read_text().startswith("A 8x8 test image")

        assert _ctl(settings.control.socket, "--force", str(photos[kept]), str(photos[elsewhere])) == 0

        capsys.readouterr()
        assert sidecars[kept].read_text().startswith("A 8x8 test image")
        assert sidecars[elsewhere].read_text().startswith("A 8x8 test image")
