"""Intake's scan threads: one per root, so a root whose scan hangs holds up only its own."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from phicapd.config import Settings, WatchRoot
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.reconciler import ScanReport


class FakeReconciler:
    """Records scans; a scan of ``hung`` blocks until released (a hard-mounted share)."""

    def __init__(self, settings: Settings, hung: Path) -> None:
        self.settings = settings
        self.hung = hung
        self.release = threading.Event()
        self.hanging = threading.Event()  # a scan of ``hung`` has begun
        self.scanned: list[tuple[Path, Path, str]] = []
        self.roots: dict[Path, WatchRoot] = {}  # the WatchRoot each root was last scanned with

    def scan(self, root: WatchRoot, directory: Path, reason: str) -> ScanReport:
        if root.path == self.hung:
            self.hanging.set()
            self.release.wait(10)
        self.roots[root.path] = root
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


def _scan_threads() -> int:
    return sum(t.name.startswith("phicapd-scan-") for t in threading.enumerate())


def test_set_roots_starts_and_stops_scan_threads_and_uses_the_new_settings(tmp_path: Path) -> None:
    nas, local = WatchRoot(path=tmp_path / "nas"), WatchRoot(path=tmp_path / "local")
    reconciler = FakeReconciler(Settings(watch=[nas, local]), hung=nas.path)
    intake = Intake(reconciler, on_queued=lambda: None)  # type: ignore[arg-type]
    before = _scan_threads()
    intake.start()
    try:
        assert _scan_threads() == before + 2
        intake.rescan(nas, reason="timer")
        assert reconciler.hanging.wait(5)

        added = WatchRoot(path=tmp_path / "added")
        changed = local.model_copy(update={"prompt": "new"})
        intake.set_roots([changed, added])
        assert _scan_threads() == before + 3  # the removed root's thread is still in its scan
        intake.rescan(added, reason="reload")
        intake.rescan(local, reason="request")  # the caller's old WatchRoot: the new one is used
        _wait(lambda: len(reconciler.scanned) == 2)
        assert sorted(reconciler.scanned) == sorted(
            [(added.path, added.path, "reload"), (local.path, local.path, "request")]
        )
        assert reconciler.roots[local.path].prompt == "new"

        intake.rescan(nas, reason="request")  # no longer watched: dropped, not queued for ever
        reconciler.release.set()  # the scan under way finishes, then its thread exits
        _wait(lambda: _scan_threads() == before + 2)
        _wait(intake.idle)
        assert [s for s in reconciler.scanned if s[0] == nas.path] == [(nas.path, nas.path, "timer")]
    finally:
        reconciler.release.set()
        intake.stop()
    assert _scan_threads() == before


def test_set_roots_drops_the_removed_roots_queued_files(tmp_path: Path) -> None:
    a, b = WatchRoot(path=tmp_path / "a"), WatchRoot(path=tmp_path / "b")
    reconciler = FakeReconciler(Settings(watch=[a, b]), hung=tmp_path / "none")
    intake = Intake(reconciler, on_queued=lambda: None)  # type: ignore[arg-type]
    for name in ("a/3.jpg", "b/4.jpg"):  # settling files must exist
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    # Not started: the files stay queued, so what set_roots does to them can be seen.
    intake.file_ready(a.path / "1.jpg", a)
    intake.file_ready(b.path / "2.jpg", b)
    intake.defer([(a.path / "3.jpg", a), (b.path / "4.jpg", b)])
    intake.set_roots([b.model_copy(update={"prompt": "new"})])
    assert intake.backlog() == {"settled_files": 1, "settling_files": 1, "scans": 0}
    intake.file_ready(a.path / "5.jpg", a)
    intake.rescan(a)
    assert intake.backlog() == {"settled_files": 1, "settling_files": 1, "scans": 0}
    assert [root.prompt for _, root in intake._files] == ["new"]


def test_a_file_deferred_by_many_scans_is_held_once(tmp_path: Path) -> None:
    root = WatchRoot(path=tmp_path)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    future = time.time() + 86400
    os.utime(image, (future, future))
    intake = Intake(FakeReconciler(Settings(watch=[root]), hung=tmp_path / "none"), on_queued=lambda: None)  # type: ignore[arg-type]
    for _ in range(3):
        intake.defer([(image, root)])
    assert intake.backlog()["settling_files"] == 1
    intake.defer([(tmp_path / "gone.jpg", root)])  # vanished before it was deferred
    assert intake.backlog()["settling_files"] == 1


class SlowJournal(FakeReconciler):
    """accept() blocks until released: a settled file that is in neither queue nor journal yet."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, hung=Path("/nonexistent"))
        self.accepting = threading.Event()
        self.accepted: list[Path] = []

    def accept(self, settled):
        self.accepting.set()
        self.release.wait(10)
        self.accepted += [path for path, _ in settled]
        return len(self.accepted)


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
