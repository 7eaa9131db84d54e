"""Images stamped in the future (``cp -p`` from a machine whose clock runs ahead, unzip, a camera
with a wrong clock, NFS skew), found by a scan rather than by a close event: each settles on
"unchanged since the last look", is held once however many scans find it, is captioned once, and
its sidecar is then up to date for every later scan."""

from __future__ import annotations

import os
import time
from pathlib import Path

from phicapd.service import Daemon
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

TEN_DAYS = 10 * 24 * 3600


def _future_png(path: Path, index: int) -> str:
    key = write_unique_png(path, index)
    future = time.time() + TEN_DAYS
    os.utime(path, (future, future))
    return key


def _scan(daemon: Daemon) -> None:
    """A `phicapctl rescan`, waited for."""
    done = daemon.intake.scans_done
    daemon.api.rescan()
    wait_for(lambda: daemon.intake.scans_done > done, 10, "the rescan")


def _captioned(daemon: Daemon, sidecar: Path) -> None:
    wait_for(lambda: sidecar.exists() and is_settled(daemon), 20, f"{sidecar.name} and nothing left to do")


def test_found_by_the_start_up_scan_it_is_captioned_once(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    key = _future_png(root / "a.png", 1)
    fake = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root]), fake) as daemon:
        _captioned(daemon, root / "a.txt")
        for _ in range(2):  # its sidecar is up to date although older than the image's mtime
            _scan(daemon)
            assert daemon.intake.last_scan is not None and daemon.intake.last_scan.queued == 0
        wait_for(lambda: is_settled(daemon), 10, "nothing left to do")
    assert fake.calls == {key: 1}


def test_found_by_rescan_it_is_held_once_however_many_scans_find_it(tmp_path: Path) -> None:
    root, outside = tmp_path / "photos", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    fake = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], settle=1.0), fake) as daemon:
        key = _future_png(outside / "a.png", 1)
        # A new name for bytes already written (`cp -l`): no close event, only a scan finds it.
        os.link(outside / "a.png", root / "a.png")
        _scan(daemon)
        assert daemon.intake.last_scan is not None and daemon.intake.last_scan.deferred == [root / "a.png"]
        for _ in range(3):
            assert daemon.intake.backlog()["settling_files"] <= 1
            _scan(daemon)
        assert daemon.intake.backlog()["settling_files"] <= 1
        _captioned(daemon, root / "a.txt")
    assert fake.calls == {key: 1}


def test_found_in_a_new_directory_it_is_captioned_once(tmp_path: Path) -> None:
    root, album = tmp_path / "photos", tmp_path / "album"
    root.mkdir()
    album.mkdir()
    fake = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root]), fake) as daemon:
        key = _future_png(album / "a.png", 1)
        os.rename(album, root / "album")  # unzipped elsewhere, moved in: the new directory's scan finds it
        _captioned(daemon, root / "album" / "a.txt")
    assert fake.calls == {key: 1}
