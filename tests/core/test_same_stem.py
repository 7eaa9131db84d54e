"""A sidecar, once it belongs to an image, stays that image's (issue 13, item 1).

``photo.png`` is captioned into ``photo.txt``; a same-stem ``photo.jpg`` that arrives later sorts
first, and the plain naming rule would hand it ``photo.txt``. The journal's claims give it the
other name instead, under every ``existing`` policy, whether the sidecar came from the watcher,
from a start-up scan that found it, or from ``phicapctl caption-file`` — and the caption in
``photo.txt`` (edited by hand) is never written over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

POLICIES = ["skip", "only-missing", "overwrite"]
HAND = "Edited by hand.\n"


def _settings(tmp_path: Path, root: Path, policy: str):
    return settings_for(tmp_path, [root], extra=f'[sidecar]\nexisting = "{policy}"\n')


def _edit_by_hand(sidecar: Path) -> None:
    sidecar.write_text(HAND)
    later = time.time() + 5  # clearly newer than the image, as an edit is
    os.utime(sidecar, (later, later))


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), *args])


def _captioned(sidecar: Path, key: str) -> bool:
    return sidecar.exists() and key in sidecar.read_text()


@pytest.mark.parametrize("policy", POLICIES)
def test_a_later_same_stem_image_gets_the_other_name(tmp_path: Path, policy: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    with running_daemon(_settings(tmp_path, root, policy), fake) as daemon:
        png = write_unique_png(root / "photo.png", 1)
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.txt", png), 30, "photo.png's caption")
        _edit_by_hand(root / "photo.txt")

        jpg = write_unique_png(root / "photo.jpg", 2)
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.jpg.txt", jpg), 30, "photo.jpg's caption")
        assert (root / "photo.txt").read_text() == HAND
        assert not (root / "photo.png.txt").exists()

        daemon.api.rescan()  # the naming holds on every later look
        wait_for(lambda: is_settled(daemon) and daemon.intake.scans_done >= 2, 30, "the rescan")
        assert (root / "photo.txt").read_text() == HAND
        assert fake.calls[png] == 1 and fake.calls[jpg] == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sidecar_found_at_start_stays_its_images(tmp_path: Path, policy: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    png = write_unique_png(root / "photo.png", 1)
    old = time.time() - 3600
    os.utime(root / "photo.png", (old, old))
    (root / "photo.txt").write_text(HAND)  # written by another tool, before phicapd ever ran
    fake = FakeCaptioner()
    with running_daemon(_settings(tmp_path, root, policy), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.intake.scans_done >= 1, 30, "the catch-up scan")
        # overwrite replaces what phicapd did not write; the others keep it. Either way it is photo.png's.
        kept = (root / "photo.txt").read_text()
        assert (kept == HAND) == (policy != "overwrite")
        assert fake.calls[png] == (policy == "overwrite")

        jpg = write_unique_png(root / "photo.jpg", 2)
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.jpg.txt", jpg), 30, "photo.jpg's caption")
        assert (root / "photo.txt").read_text() == kept
        assert not (root / "photo.png.txt").exists()


@pytest.mark.parametrize("policy", POLICIES)
def test_caption_file_names_a_same_stem_newcomer_as_the_watcher_does(tmp_path: Path, policy: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = _settings(tmp_path, root, policy)
    with running_daemon(settings, fake) as daemon:
        png = write_unique_png(root / "photo.png", 1)
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.txt", png), 30, "photo.png's caption")
        _edit_by_hand(root / "photo.txt")

        daemon.scheduler.pause()  # so that only phicapctl captions the newcomer
        jpg = write_unique_png(root / "photo.jpg", 2)
        assert _ctl(settings.control.socket, "caption-file", str(root / "photo.jpg")) == 0
        assert _captioned(root / "photo.jpg.txt", jpg)
        assert (root / "photo.txt").read_text() == HAND

        daemon.scheduler.resume()
        wait_for(lambda: is_settled(daemon), 30, "the watcher's own look at photo.jpg")
        assert (root / "photo.txt").read_text() == HAND
        assert _captioned(root / "photo.jpg.txt", jpg)
        assert not (root / "photo.png.txt").exists()
        # phicapctl reported its caption (/v1/captioned): the journal holds it as phicapd's own, so
        # not even overwrite (which replaces what phicapd did not write) captions it again.
        assert fake.calls[jpg] == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sidecar_phicapctl_wrote_stays_its_images(tmp_path: Path, policy: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = _settings(tmp_path, root, policy)
    with running_daemon(settings, fake) as daemon:
        daemon.scheduler.pause()
        png = write_unique_png(root / "photo.png", 1)
        assert _ctl(settings.control.socket, "caption-file", str(root / "photo.png")) == 0
        assert _captioned(root / "photo.txt", png)
        _edit_by_hand(root / "photo.txt")

        # By the listing alone photo.jpg would take photo.txt; the claim phicapctl reported says no.
        jpg = write_unique_png(root / "photo.jpg", 2)
        assert _ctl(settings.control.socket, "caption-file", str(root / "photo.jpg")) == 0
        assert _captioned(root / "photo.jpg.txt", jpg)
        assert (root / "photo.txt").read_text() == HAND

        daemon.scheduler.resume()
        wait_for(lambda: is_settled(daemon), 30, "the watcher's jobs")
        assert _captioned(root / "photo.jpg.txt", jpg)
        assert not (root / "photo.png.txt").exists()
        # phicapctl reported photo.png's caption (/v1/captioned): the journal holds it as phicapd's
        # own, so, edited since, it is kept under every policy as the daemon's own would be.
        assert (root / "photo.txt").read_text() == HAND
        assert fake.calls[png] == 1


def test_the_claims_survive_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, "only-missing")
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        png = write_unique_png(root / "photo.png", 1)
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.txt", png), 30, "photo.png's caption")
    _edit_by_hand(root / "photo.txt")
    jpg = write_unique_png(root / "photo.jpg", 2)  # arrives while the daemon is down
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.jpg.txt", jpg), 30, "the catch-up")
    assert (root / "photo.txt").read_text() == HAND
    assert fake.calls[png] == 1


def test_an_image_that_arrived_while_the_daemon_was_down_does_not_take_an_older_images_sidecar(
    tmp_path: Path,
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    png = write_unique_png(root / "photo.png", 1)
    (root / "photo.txt").write_text(HAND)  # photo.png's caption, from before phicapd ran
    hour_ago, half_hour_ago = time.time() - 3600, time.time() - 1800
    os.utime(root / "photo.png", (hour_ago, hour_ago))
    os.utime(root / "photo.txt", (half_hour_ago, half_hour_ago))
    jpg = write_unique_png(root / "photo.jpg", 2)  # newer than the caption: it cannot be its
    fake = FakeCaptioner()
    with running_daemon(_settings(tmp_path, root, "skip"), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and _captioned(root / "photo.jpg.txt", jpg), 30, "the catch-up")
    assert (root / "photo.txt").read_text() == HAND
    assert fake.calls[png] == 0 and fake.calls[jpg] == 1
