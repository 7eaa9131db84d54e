"""Intake's scan threads: one per root, so a root whose scan hangs holds up only its own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from phicapd.config import Settings, WatchRoot
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.scanner import ScanReport


class FakeReconciler:
    """Records scans; a scan of ``hung`` blocks until released (a hard-mounted share)."""

    def __init__(self, settings: Settings, hung: Path) -> None:
        self.settings = settings
        self.hung = hung
        self.release = threading.Event()
        self.scanned: list[tuple[Path, Path, str]] = []

    def scan(self, root: WatchRoot, directory: Path, reason: str) -> ScanReport:
        if root.path == self.hung:
            self.release.wait(10)
        self.scanned.append((root.path, directory, reason))
        return ScanReport(root.path, directory, reason, 0, 0, 0, 0.0, [])


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_hung_scan_holds_up_only_its_own_root(tmp_path: Path) -> None:
    nas, local = WatchRoot(path=tmp_path / "nas"), WatchRoot(path=tmp_path / "local")
    reconciler = FakeReconciler(Settings(watch=[nas, local]), hung=nas.path)
    intake = Intake(reconciler, on_queued=lambda: None)  # type: ignore[arg-type]
    intake.start()
    try:
        intake.rescan(nas, reason="timer")
        _wait(lambda: intake.backlog()["scans"] == 1 and not intake.idle())
        intake.rescan(local, reason="timer")
        _wait(lambda: (local.path, local.path, "timer") in reconciler.scanned)
        assert reconciler.scanned == [(local.path, local.path, "timer")]
        assert not intake.idle()  # the hung one is still running
        reconciler.release.set()
        _wait(intake.idle)
        assert reconciler.scanned[-1] == (nas.path, nas.path, "timer")
        assert intake.scans_done == 2
    finally:
        reconciler.release.set()
        intake.stop()


class SlowJournal(FakeReconciler):
    """accept() blocks until released: a settled file that is in neither queue nor journal yet."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, hung=Path("/nonexistent"))
        self.accepting = threading.Event()
        self.accepted: list[Path] = []

    def accept(self, settled, young_after=None):
        self.accepting.set()
        self.release.wait(10)
        self.accepted += [path for path, _ in settled]
        return len(self.accepted), []


def test_a_file_on_its_way_into_the_journal_is_not_idle(tmp_path: Path) -> None:
    # is_settled() in the tests (and anyone waiting for "nothing left") reads idle() and then the
    # journal: a file in between must count, or a run is stopped before its work was recorded.
    root = WatchRoot(path=tmp_path)
    reconciler = SlowJournal(Settings(watch=[root]))
    intake = Intake(reconciler, on_queued=lambda: None)  # type: ignore[arg-type]
    intake.start()
    try:
        intake.file_ready(tmp_path / "a.jpg", root)
        assert reconciler.accepting.wait(5)
        assert not intake.idle()
        reconciler.release.set()
        _wait(intake.idle)
        assert reconciler.accepted == [tmp_path / "a.jpg"]
    finally:
        reconciler.release.set()
        intake.stop()
