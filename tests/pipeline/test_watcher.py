"""The watcher: filesystem events -> on_ready / on_rescan, with real inotify and polling observers.

Settle times are 0.2 s so the file runs in a few seconds. "Exactly once" is checked behind a
barrier: a last file written after everything else is ready only after every earlier event has
been handled (one ordered event queue, deadlines in order), and then nothing is pending.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

from phicapd.config import WatcherSettings, WatchRoot
from phicapd.outputs.atomic import write_sidecar
from phicapd.pipeline import inotify_adapter, rescans
from phicapd.pipeline import watcher as watcher_mod
from phicapd.pipeline.inotify_adapter import INOTIFY_LOGGER
from phicapd.pipeline.mounts import filesystem_type, is_remote_filesystem, needs_polling, parse_mountinfo
from phicapd.pipeline.settle import SettleTable
from phicapd.pipeline.watcher import Watcher

SETTLE = 0.2
TIMEOUT = 10.0


class Recorder:
    """Collects callbacks and lets the test wait for a condition on them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: list[tuple[Path, int, float]] = []  # path, size seen, when
        self.rescans: list[tuple[Path, Path, str]] = []  # root path, directory, reason
        self.ready_threads: set[str] = set()
        self.ready_roots: dict[Path, WatchRoot] = {}  # the root each file was last reported with

    def on_ready(self, path: Path, root: WatchRoot) -> None:
        size = path.stat().st_size if path.exists() else -1
        with self.cond:
            self.ready.append((path, size, time.monotonic()))
            self.ready_roots[path] = root
            self.ready_threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def on_rescan(self, root: WatchRoot, directory: Path, reason: str) -> None:
        with self.cond:
            self.rescans.append((root.path, directory, reason))
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = TIMEOUT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), timeout), (self.ready, self.rescans)

    def ready_names(self) -> list[str]:
        with self.cond:
            return [p.name for p, _, _ in self.ready if not p.name.startswith("barrier")]

    def ready_for(self, path: Path) -> list[tuple[Path, int, float]]:
        with self.cond:
            return [r for r in self.ready if r[0] == path]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    d = tmp_path / "root"
    d.mkdir()
    return d


def make_watcher(
    rec: Recorder,
    roots: list[WatchRoot],
    *,
    settle: float = SETTLE,
    rescan_interval: float = 0.0,
    poll_interval: float = 0.1,
) -> Watcher:
    settings = WatcherSettings(
        settle_seconds=settle, rescan_interval_seconds=rescan_interval, poll_interval_seconds=poll_interval
    )
    return Watcher(roots, settings, on_ready=rec.on_ready, on_rescan=rec.on_rescan)


@pytest.fixture
def running(rec: Recorder, root_dir: Path) -> Iterator[Watcher]:
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=False)])
    w.start()
    yield w
    w.stop()


_barriers = iter(range(1_000_000))


def barrier(rec: Recorder, w: Watcher, directory: Path) -> None:
    """Wait until every event before this call has been handled and nothing is pending."""
    marker = directory / f"barrier-{next(_barriers)}.jpg"
    marker.write_bytes(b"barrier")
    rec.wait_for(lambda r: any(p == marker for p, _, _ in r.ready))
    assert w.pending() == 0


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """For state that no callback announces (pending(), last_progress)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def write(path: Path, data: bytes = b"\xff\xd8image") -> float:
    path.write_bytes(data)
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# inotify: files


def test_written_in_place_and_renamed_in_are_ready_once_after_settle(
    rec: Recorder, running: Watcher, root_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    written_at = write(root_dir / "in-place.jpg")
    write(outside / "moved.png")
    os.rename(outside / "moved.png", root_dir / "moved.png")
    moved_at = time.monotonic()
    sub = root_dir / "sub"
    sub.mkdir()
    rec.wait_for(lambda r: any(d == sub for _, d, _ in r.rescans))  # the subdirectory is watched now
    write(sub / "deep.jpg")

    barrier(rec, running, root_dir)
    assert sorted(rec.ready_names()) == ["deep.jpg", "in-place.jpg", "moved.png"]
    [(_, _, ready_at)] = rec.ready_for(root_dir / "in-place.jpg")
    assert ready_at >= written_at + SETTLE
    [(_, _, ready_at)] = rec.ready_for(root_dir / "moved.png")
    assert ready_at >= moved_at + SETTLE
    assert rec.ready_threads == {"phicapd-watcher"}


def test_a_ready_file_counts_as_pending_until_on_ready_has_it(root_dir: Path) -> None:
    # Between leaving the settle table and reaching on_ready a file is in neither place; a caller
    # waiting for "pending() == 0 and the consumer is idle" must not see that gap as done.
    entered, release = threading.Event(), threading.Event()

    def on_ready(path: Path, root: WatchRoot) -> None:
        entered.set()
        release.wait(10)

    w = Watcher(
        [WatchRoot(path=root_dir, poll=False)],
        WatcherSettings(settle_seconds=SETTLE, rescan_interval_seconds=0.0),
        on_ready=on_ready,
        on_rescan=lambda *_: None,
    )
    w.start()
    try:
        write(root_dir / "a.jpg")
        assert entered.wait(TIMEOUT)
        assert w.pending() == 1
        release.set()
        wait_until(lambda: w.pending() == 0)
    finally:
        release.set()
        w.stop()


def test_slow_writer_closing_and_reopening_is_ready_once_after_the_last_write(
    rec: Recorder, running: Watcher, root_dir: Path
) -> None:
    path = root_dir / "slow.jpg"
    chunk = b"x" * (64 * 1024)  # 32 chunks = 2 MiB
    with path.open("wb") as f:
        for _ in range(16):
            f.write(chunk)
            f.flush()
            time.sleep(0.04)  # the writer's pace, well under the settle time
    # Closed once; reopened at once, then silent for longer than the settle time while open:
    # the watcher must wait for the close, not for the silence.
    with path.open("ab") as f:
        f.write(chunk)
        f.flush()
        time.sleep(SETTLE * 3)
        for _ in range(15):
            f.write(chunk)
            f.flush()
            time.sleep(0.04)
    closed_at = time.monotonic()

    barrier(rec, running, root_dir)
    [(_, size, ready_at)] = rec.ready_for(path)
    assert size == 32 * len(chunk)
    assert ready_at >= closed_at + SETTLE


def test_partial_download_and_rsync_temp_are_ready_only_under_their_final_name(
    rec: Recorder, running: Watcher, root_dir: Path
) -> None:
    (root_dir / "download.jpg").touch()  # Firefox's empty placeholder, replaced at the end
    part = root_dir / "download.jpg.part"
    with part.open("wb") as f:
        for _ in range(5):
            f.write(b"y" * 4096)
            f.flush()
            time.sleep(0.05)
    time.sleep(SETTLE * 2)  # the partial file sits closed for a while before the rename
    os.rename(part, root_dir / "download.jpg")
    rsync_tmp = root_dir / ".synced.jpg.AbC123"
    write(rsync_tmp)
    os.rename(rsync_tmp, root_dir / "synced.jpg")

    barrier(rec, running, root_dir)
    assert sorted(rec.ready_names()) == ["download.jpg", "synced.jpg"]
    [(_, size, _)] = rec.ready_for(root_dir / "download.jpg")
    assert size == 5 * 4096


def test_hidden_temporary_partial_and_sidecar_files_never_trigger_work(
    rec: Recorder, running: Watcher, root_dir: Path
) -> None:
    for name in (".hidden.jpg", "photo.jpg.swp", "photo.jpg~", "photo.jpg.crdownload", "photo.jpg.part"):
        write(root_dir / name)
    write_sidecar(root_dir / "photo.txt", "a caption")  # our own temp file + rename
    (root_dir / "notes.txt").write_text("x")
    hidden = root_dir / ".cache"
    hidden.mkdir()
    write(hidden / "thumb.jpg")

    barrier(rec, running, root_dir)
    assert rec.ready_names() == []
    assert rec.rescans == []


def test_deleted_before_settling_is_dropped(rec: Recorder, root_dir: Path) -> None:
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=False)], settle=0.5)
    w.start()
    try:
        gone = root_dir / "gone.jpg"
        write(gone)
        wait_until(lambda: w.pending() == 1)
        gone.unlink()
        barrier(rec, w, root_dir)
        assert rec.ready_names() == []
    finally:
        w.stop()


def test_a_changed_file_after_ready_is_ready_again(rec: Recorder, running: Watcher, root_dir: Path) -> None:
    path = root_dir / "edited.jpg"
    write(path, b"one")
    rec.wait_for(lambda r: len(r.ready_for(path)) == 1)
    write(path, b"two, longer")
    barrier(rec, running, root_dir)
    assert [size for _, size, _ in rec.ready_for(path)] == [3, 11]


# ---------------------------------------------------------------------------------------------
# inotify: directories, overflow, timer, failures


def test_new_and_moved_in_subdirectories_request_a_rescan(
    rec: Recorder, running: Watcher, root_dir: Path, tmp_path: Path
) -> None:
    created = root_dir / "created"
    created.mkdir()
    rec.wait_for(lambda r: (root_dir, created, "new_dir") in r.rescans)

    outside = tmp_path / "album"
    (outside / "inner").mkdir(parents=True)
    write(outside / "a.jpg")
    write(outside / "inner" / "b.jpg")
    moved = root_dir / "album"
    os.rename(outside, moved)
    rec.wait_for(lambda r: (root_dir, moved, "new_dir") in r.rescans)

    # The moved-in tree is watched: a new file in it is ready; the old ones are the scan's job.
    write(moved / "inner" / "c.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_names() == ["c.jpg"]
    assert sorted(d.name for _, d, _ in rec.rescans) == ["album", "created"]


def test_a_directory_moved_out_or_replaced_keeps_the_root_watched_without_a_rescan(
    rec: Recorder, running: Watcher, root_dir: Path, tmp_path: Path
) -> None:
    # watchdog 7.1 asks the move grouper about pending moves here; a grouper without those
    # queries killed the root's emitter, which cost a whole-root "observer_error" rescan.
    (tmp_path / "album" / "inner").mkdir(parents=True)
    album = root_dir / "album"
    os.rename(tmp_path / "album", album)
    rec.wait_for(lambda r: len(r.rescans) == 1)  # its "new_dir"
    os.rename(album, tmp_path / "gone")
    album.mkdir()  # a new directory at the same path
    rec.wait_for(lambda r: len(r.rescans) == 2)
    write(album / "a.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_names() == ["a.jpg"]
    assert [reason for _, _, reason in rec.rescans] == ["new_dir", "new_dir"]
    assert all(e.is_alive() for e in running._observers.running[False].emitters)


def test_overflow_log_record_requests_a_rescan_of_every_inotify_root(rec: Recorder, tmp_path: Path) -> None:
    a, b, polled = tmp_path / "a", tmp_path / "b", tmp_path / "polled"
    for d in (a, b, polled):
        d.mkdir()
    roots = [WatchRoot(path=a, poll=False), WatchRoot(path=b, poll=False), WatchRoot(path=polled, poll=True)]
    w = make_watcher(rec, roots)
    w.start()
    try:
        logging.getLogger(INOTIFY_LOGGER).warning("Inotify queue overflowed; filesystem events were lost")
        rec.wait_for(lambda r: len(r.rescans) >= 2)
        assert sorted(rec.rescans) == [(a, a, "overflow"), (b, b, "overflow")]
    finally:
        w.stop()
    # A stopped watcher no longer listens.
    assert w._observers.overflow_handler not in logging.getLogger(INOTIFY_LOGGER).handlers


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def test_real_inotify_overflow_requests_a_rescan_and_watching_goes_on(
    rec: Recorder, root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip("cannot lower fs.inotify.max_queued_events here")
    # Hold the reader back during the flood, like a busy one: a fast reader can keep a queue of
    # 16 from overflowing, and the test would depend on the scheduler's timing.
    flooded = threading.Event()
    read_events = inotify_adapter.OverflowReportingInotifyFD.read_events

    def slow_read_events(self: Any) -> Any:
        flooded.wait(TIMEOUT)
        return read_events(self)

    monkeypatch.setattr(inotify_adapter.OverflowReportingInotifyFD, "read_events", slow_read_events)
    old = MAX_QUEUED.read_text()
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=False)])
    # The limit is read when an inotify instance is created, so it is lowered only around
    # start(): other processes are affected only if they create one in that instant.
    try:
        MAX_QUEUED.write_text("16")
        w.start()
    finally:
        MAX_QUEUED.write_text(old)
    try:
        for i in range(2000):
            (root_dir / f"flood-{i}.dat").touch()
        flooded.set()
        rec.wait_for(lambda r: (root_dir, root_dir, "overflow") in r.rescans)
        # Watching goes on: a new file is ready, or its events were lost in a later overflow,
        # which is reported again (then try once more).
        for attempt in range(20):
            with rec.cond:
                reported = len(rec.rescans)
            marker = root_dir / f"after-{attempt}.jpg"
            write(marker)
            rec.wait_for(lambda r, m=marker, n=reported: bool(r.ready_for(m)) or len(r.rescans) > n)
            if rec.ready_for(marker):
                break
        else:
            pytest.fail("no file became ready after the overflow")
    finally:
        w.stop()


def test_timer_requests_a_rescan_of_every_root(rec: Recorder, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = make_watcher(rec, [WatchRoot(path=a, poll=False), WatchRoot(path=b, poll=True)], rescan_interval=0.3)
    started = time.monotonic()
    w.start()
    try:
        rec.wait_for(lambda r: {(a, a, "timer"), (b, b, "timer")} <= set(r.rescans))
        assert time.monotonic() - started >= 0.3
    finally:
        w.stop()


def test_full_settle_table_drops_and_requests_an_overflow_rescan(
    rec: Recorder, root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher_mod, "MAX_PENDING", 3)
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=False)], settle=30)
    w.start()
    try:
        for i in range(5):
            write(root_dir / f"{i}.jpg")
        rec.wait_for(lambda r: (root_dir, root_dir, "overflow") in r.rescans)
        assert w.pending() == 3
    finally:
        w.stop()


def test_a_flood_of_new_directories_collapses_into_one_root_rescan(
    rec: Recorder, root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rescans, "MAX_QUEUED_RESCANS", 2)
    release = threading.Event()

    def blocking_rescan(root: WatchRoot, directory: Path, reason: str) -> None:
        rec.on_rescan(root, directory, reason)
        release.wait(TIMEOUT)  # hold the settle thread so that requests pile up

    settings = WatcherSettings(settle_seconds=SETTLE, rescan_interval_seconds=0)
    w = Watcher([WatchRoot(path=root_dir, poll=False)], settings, on_ready=rec.on_ready, on_rescan=blocking_rescan)
    requested: list[Path] = []
    queue_rescan = w._queue_rescan

    def spy(watch: Any, directory: Path, reason: str) -> None:
        requested.append(directory)
        queue_rescan(watch, directory, reason)

    w._queue_rescan = spy  # type: ignore[method-assign]
    w.start()
    try:
        (root_dir / "d0").mkdir()
        rec.wait_for(lambda r: len(r.rescans) == 1)
        new_dirs = {root_dir / f"d{i}" for i in range(1, 6)}
        for directory in sorted(new_dirs):
            directory.mkdir()
        # Every event handled (a late one would queue its own rescan after the root's), collapsed.
        wait_until(lambda: new_dirs <= set(requested))
        assert (0, root_dir) in w._rescans
        release.set()
        rec.wait_for(lambda r: len(r.rescans) == 2)
        assert rec.rescans == [(root_dir, root_dir / "d0", "new_dir"), (root_dir, root_dir, "overflow")]
        barrier(rec, w, root_dir)
        assert len(rec.rescans) == 2
    finally:
        release.set()
        w.stop()


def test_callback_exceptions_are_logged_and_do_not_stop_the_watcher(rec: Recorder, root_dir: Path) -> None:
    calls: list[Path] = []

    def flaky(path: Path, root: WatchRoot) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("boom")
        rec.on_ready(path, root)

    settings = WatcherSettings(settle_seconds=SETTLE, rescan_interval_seconds=0)
    w = Watcher([WatchRoot(path=root_dir, poll=False)], settings, on_ready=flaky, on_rescan=rec.on_rescan)
    w.start()
    try:
        write(root_dir / "first.jpg")
        barrier(rec, w, root_dir)
        assert calls[0].name == "first.jpg"
        assert len(calls) == 2  # the barrier file: the thread survived the exception
    finally:
        w.stop()


def test_dead_observer_is_restarted_with_a_rescan(rec: Recorder, running: Watcher, root_dir: Path) -> None:
    observer = running._observers.running[False]
    observer.stop()
    observer.join()
    rec.wait_for(lambda r: (root_dir, root_dir, "observer_error") in r.rescans)
    write(root_dir / "after.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_names() == ["after.jpg"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the reader's death
def test_a_dead_inotify_reader_is_restarted_with_a_rescan(
    rec: Recorder, running: Watcher, root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An exception in a callback of watchdog's inotify reader ends the reader thread and closes
    # its fd: the observer thread still runs, but none of its watches sees an event again.
    def broken(self: Any, event: Any) -> None:
        raise AttributeError("a watchdog internal that changed")

    monkeypatch.setattr(inotify_adapter.OverflowReportingInotifyFD, "handle_event", broken)
    write(root_dir / "kills-the-reader.jpg")
    rec.wait_for(lambda r: (root_dir, root_dir, "observer_error") in r.rescans)
    monkeypatch.undo()
    write(root_dir / "after.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_names() == ["after.jpg"]


def test_deleted_root_is_watched_again_when_it_returns(rec: Recorder, running: Watcher, root_dir: Path) -> None:
    root_dir.rmdir()
    root_dir.mkdir()
    rec.wait_for(lambda r: (root_dir, root_dir, "observer_error") in r.rescans)
    write(root_dir / "back.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_names() == ["back.jpg"]


# ---------------------------------------------------------------------------------------------
# set_roots: roots added, removed and changed while running (a configuration reload)


def test_a_root_added_at_run_time_is_scanned_and_watched(rec: Recorder, running: Watcher, tmp_path: Path) -> None:
    first = running._watches[0].root
    added = tmp_path / "added"
    (added / "sub").mkdir(parents=True)
    running.set_roots([first, WatchRoot(path=added, poll=False)])
    rec.wait_for(lambda r: (added, added, "reload") in r.rescans)  # files already there: the scan's job
    write(added / "new.jpg")
    write(added / "sub" / "deep.jpg")
    barrier(rec, running, added)
    assert sorted(rec.ready_names()) == ["deep.jpg", "new.jpg"]
    assert [reason for _, _, reason in rec.rescans] == ["reload"]


def test_a_removed_root_reports_nothing_more_and_forgets_its_pending_files(rec: Recorder, tmp_path: Path) -> None:
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    kept.mkdir()
    dropped.mkdir()
    w = make_watcher(rec, [WatchRoot(path=kept, poll=False), WatchRoot(path=dropped, poll=False)], settle=0.5)
    w.start()
    try:
        write(dropped / "pending.jpg")
        wait_until(lambda: w.pending() == 1)
        w.set_roots([WatchRoot(path=kept, poll=False)])
        assert w.pending() == 0
        write(dropped / "after.jpg")
        (dropped / "new-dir").mkdir()
        write(kept / "kept.jpg")
        barrier(rec, w, kept)
        assert rec.ready_names() == ["kept.jpg"]
        assert rec.rescans == []
        assert [str(watch.root.path) for watch in w._watches.values()] == [str(kept)]
        assert len(w._observers.running[False].emitters) == 1
    finally:
        w.stop()


def test_a_changed_root_is_reported_with_its_new_settings_and_rescanned_when_it_captions_more(
    rec: Recorder, running: Watcher, root_dir: Path
) -> None:
    (root_dir / "sub").mkdir()
    rec.wait_for(lambda r: len(r.rescans) == 1)  # its "new_dir"
    old = running._watches[0].root
    running.set_roots([old.model_copy(update={"prompt": "Describe the cat."})])
    write(root_dir / "a.jpg")
    barrier(rec, running, root_dir)
    assert rec.ready_roots[root_dir / "a.jpg"].prompt == "Describe the cat."
    assert len(rec.rescans) == 1  # a new prompt applies to new captions: nothing to scan for

    # Non-recursive: the subdirectory is no longer watched (watched anew), and scanned.
    running.set_roots([old.model_copy(update={"recursive": False})])
    rec.wait_for(lambda r: (root_dir, root_dir, "reload") in r.rescans)
    write(root_dir / "sub" / "ignored.jpg")
    write(root_dir / "b.jpg")
    barrier(rec, running, root_dir)
    assert "ignored.jpg" not in rec.ready_names() and "b.jpg" in rec.ready_names()

    # Recursive again, now polled: the subdirectory's new file is seen by the poller.
    running.set_roots([old.model_copy(update={"poll": True})])
    assert running._watches[0].polling
    write(root_dir / "sub" / "deep.jpg")
    rec.wait_for(lambda r: "deep.jpg" in r.ready_names())
    assert len(running._observers.running[False].emitters) == 0


def test_a_pending_file_the_changed_root_no_longer_captions_is_forgotten(rec: Recorder, root_dir: Path) -> None:
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=False)], settle=0.5)
    w.start()
    try:
        write(root_dir / "pending.png")
        wait_until(lambda: w.pending() == 1)
        w.set_roots([WatchRoot(path=root_dir, poll=False, include=["*.jpg"])])
        assert w.pending() == 0
        barrier(rec, w, root_dir)
        assert rec.ready_names() == []
    finally:
        w.stop()


def test_set_roots_before_start_only_changes_what_start_watches(rec: Recorder, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = make_watcher(rec, [WatchRoot(path=a, poll=False)])
    w.set_roots([WatchRoot(path=b, poll=False)])
    w.start()
    try:
        write(a / "no.jpg")
        barrier(rec, w, b)
        assert rec.ready_names() == []
        assert rec.rescans == []  # the caller scans its roots at start-up
    finally:
        w.stop()
    w.set_roots([WatchRoot(path=a, poll=False)])  # after stop: nothing happens


# ---------------------------------------------------------------------------------------------
# Polling


def test_polling_root_delivers_one_ready_per_file(rec: Recorder, root_dir: Path, tmp_path: Path) -> None:
    # No close events here: the settle time alone decides, so it must exceed the writer's pauses.
    w = make_watcher(rec, [WatchRoot(path=root_dir, poll=True)], settle=0.5, poll_interval=0.1)
    w.start()
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        write(root_dir / "polled.jpg")
        write(outside / "moved.jpg")
        os.rename(outside / "moved.jpg", root_dir / "moved.jpg")
        write(root_dir / ".hidden.jpg")
        slow = root_dir / "slow.jpg"
        with slow.open("wb") as f:  # grows across several polls and settle windows
            for _ in range(8):
                f.write(b"z" * 1024)
                f.flush()
                time.sleep(0.1)
        barrier(rec, w, root_dir)
        assert sorted(rec.ready_names()) == ["moved.jpg", "polled.jpg", "slow.jpg"]
        [(_, size, _)] = rec.ready_for(slow)
        assert size == 8 * 1024
    finally:
        w.stop()


MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:40 / /mnt/share rw,relatime shared:9 - nfs4 server:/export rw,vers=4.2
31 22 0:41 / /mnt/my\\040photos rw - cifs //nas/photos rw
32 30 253:1 / /mnt/share/local rw - xfs /dev/vdb rw
33 22 0:42 / /mnt/box rw - fuse.sshfs me@host:/ rw
34 22 0:43 / /mnt/over rw - nfs host:/a rw
35 22 0:44 / /mnt/over rw - tmpfs tmpfs rw
"""


def test_parse_mountinfo_unescapes_mount_points() -> None:
    assert ("/mnt/my photos", "cifs") in parse_mountinfo(MOUNTINFO)
    assert parse_mountinfo("garbage\n\n") == []


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/home/me/pics", "ext4"),
        ("/mnt/share", "nfs4"),
        ("/mnt/share/a/b", "nfs4"),
        ("/mnt/shared", "ext4"),  # a prefix of the name, not a parent directory
        ("/mnt/share/local/x", "xfs"),  # the deepest mount wins
        ("/mnt/my photos/2024", "cifs"),
        ("/mnt/box/p", "fuse.sshfs"),
        ("/mnt/over/p", "tmpfs"),  # the later mount on the same point hides the earlier
    ],
)
def test_filesystem_type_finds_the_mount_holding_the_path(path: str, fstype: str) -> None:
    assert filesystem_type(Path(path), MOUNTINFO) == fstype


def test_remote_filesystems_are_polled_unless_the_root_says_otherwise() -> None:
    assert is_remote_filesystem("nfs4") and is_remote_filesystem("fuse.sshfs") and is_remote_filesystem("9p")
    assert not is_remote_filesystem("ext4") and not is_remote_filesystem("fuse.ntfs-3g")
    assert not is_remote_filesystem(None)
    assert needs_polling(WatchRoot(path=Path("/mnt/share/p")), MOUNTINFO)
    assert not needs_polling(WatchRoot(path=Path("/mnt/share/local/p")), MOUNTINFO)
    assert not needs_polling(WatchRoot(path=Path("/mnt/share/p"), poll=False), MOUNTINFO)
    assert needs_polling(WatchRoot(path=Path("/home/p"), poll=True), MOUNTINFO)


def test_this_machine_has_a_filesystem_type_for_tmp(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path) is not None


# ---------------------------------------------------------------------------------------------
# The settle table on a fake clock


ROOT = WatchRoot(path=Path("/r"))
P = Path("/r/a.jpg")
SIG = (10, 1, 7)


def settle_all(table: SettleTable, now: float, stat: Callable[[Path], tuple[int, int, int] | None]) -> list[Path]:
    return [path for path, gen in table.due(now) if table.check(path, gen, stat(path), now) is not None]


def test_table_ready_only_after_settle_without_change() -> None:
    t = SettleTable(settle_seconds=2.0)
    assert t.add(P, ROOT, SIG, now=0.0)
    assert t.next_deadline() == 2.0
    assert settle_all(t, 1.9, lambda p: SIG) == []
    assert settle_all(t, 2.0, lambda p: SIG) == [P]
    assert len(t) == 0


def test_table_restarts_on_events_and_on_a_changed_stat() -> None:
    t = SettleTable(settle_seconds=2.0)
    t.add(P, ROOT, SIG, now=0.0)
    t.refresh(P, (20, 2, 7), now=1.5, writing=False)
    assert settle_all(t, 2.0, lambda p: (20, 2, 7)) == []
    assert t.next_deadline() == 3.5
    # A change that raised no event (polling, a lost event) is seen by the check itself.
    assert settle_all(t, 3.5, lambda p: (30, 3, 7)) == []
    assert settle_all(t, 5.5, lambda p: (30, 3, 7)) == [P]


def test_table_waits_for_close_after_a_reopen_unless_the_write_stalls() -> None:
    t = SettleTable(settle_seconds=2.0, stalled_write_seconds=10.0)
    t.add(P, ROOT, SIG, now=0.0)
    t.refresh(P, SIG, now=1.0, writing=True)
    assert settle_all(t, 3.0, lambda p: SIG) == []
    assert settle_all(t, 5.0, lambda p: SIG) == []
    t.add(P, ROOT, SIG, now=6.0)  # the close
    assert settle_all(t, 8.0, lambda p: SIG) == [P]

    t.add(P, ROOT, SIG, now=20.0)
    t.refresh(P, SIG, now=20.0, writing=True)
    for now in (22.0, 24.0, 26.0, 28.0):
        assert settle_all(t, now, lambda p: SIG) == []
    assert settle_all(t, 30.0, lambda p: SIG) == [P]  # no close came; ready after the stall


def test_table_drops_vanished_files_and_ignores_unknown_refreshes() -> None:
    t = SettleTable(settle_seconds=1.0)
    t.refresh(P, SIG, now=0.0, writing=True)
    assert len(t) == 0
    t.add(P, ROOT, SIG, now=0.0)
    assert settle_all(t, 1.0, lambda p: None) == []
    assert len(t) == 0 and t.next_deadline() is None


def test_table_discards_a_check_that_raced_with_an_event() -> None:
    t = SettleTable(settle_seconds=1.0)
    t.add(P, ROOT, SIG, now=0.0)
    [(path, gen)] = t.due(1.0)
    t.refresh(P, (11, 2, 7), now=1.0, writing=False)  # arrives while the file is being stat'ed
    assert t.check(path, gen, SIG, 1.0) is None
    assert settle_all(t, 2.0, lambda p: (11, 2, 7)) == [P]


def test_table_hands_out_an_empty_file_only_after_the_stalled_write_time() -> None:
    t = SettleTable(settle_seconds=1.0, stalled_write_seconds=10.0)
    t.add(P, ROOT, (0, 1, 7), now=0.0)
    assert settle_all(t, 1.0, lambda p: (0, 1, 7)) == []  # a placeholder, perhaps
    assert settle_all(t, 9.5, lambda p: (0, 1, 7)) == []
    assert settle_all(t, 10.5, lambda p: (0, 1, 7)) == [P]  # still empty: an empty image, to be recorded
    assert len(t) == 0


def test_table_drops_a_file_that_is_gone() -> None:
    t = SettleTable(settle_seconds=1.0)
    t.add(P, ROOT, (0, 1, 7), now=0.0)
    assert settle_all(t, 1.0, lambda p: None) == []
    assert len(t) == 0


def test_table_is_capped() -> None:
    t = SettleTable(settle_seconds=1.0, max_entries=2)
    assert t.add(Path("/r/1.jpg"), ROOT, SIG, 0.0)
    assert t.add(Path("/r/2.jpg"), ROOT, SIG, 0.0)
    assert not t.add(Path("/r/3.jpg"), ROOT, SIG, 0.0)
    assert t.add(Path("/r/2.jpg"), ROOT, SIG, 0.5)  # a known file still restarts
    assert len(t) == 2


# ---------------------------------------------------------------------------------------------
# Lifecycle


def test_stop_is_prompt_and_idempotent(rec: Recorder, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    w = make_watcher(rec, [WatchRoot(path=a, poll=False), WatchRoot(path=b, poll=True)], poll_interval=30)
    w.stop()  # before start: nothing to do
    w = make_watcher(rec, [WatchRoot(path=a, poll=False), WatchRoot(path=b, poll=True)], poll_interval=30)
    w.start()
    write(a / "pending.jpg")
    wait_until(lambda: w.pending() == 1)
    started = time.monotonic()
    w.stop()
    assert time.monotonic() - started < 2.0
    w.stop()
    assert not any(t.name == "phicapd-watcher" for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        w.start()


def test_last_progress_advances_while_idle(rec: Recorder, running: Watcher) -> None:
    first = running.last_progress
    wait_until(lambda: running.last_progress > first, timeout=3 * watcher_mod.MAX_IDLE_SECONDS)


# ---------------------------------------------------------------------------------------------
# The move grouper (watchdog's pairing of IN_MOVED_FROM / IN_MOVED_TO, indexed by cookie)


def _inotify_event(mask: int, cookie: int, name: str) -> PathedInotifyEvent:
    return PathedInotifyEvent(InotifyEvent(1, mask, cookie, name.encode()), f"/w/{name}".encode())


def test_move_grouper_pairs_by_cookie_in_order_and_holds_a_lone_move_out() -> None:
    grouper = inotify_adapter.CookieIndexedMoveGrouper()
    grouper.delay = 0.1
    lone = _inotify_event(InotifyConstants.IN_MOVED_FROM, 7, "gone.jpg")
    src = _inotify_event(InotifyConstants.IN_MOVED_FROM, 8, "a.jpg.part")
    closed = _inotify_event(InotifyConstants.IN_CLOSE_WRITE, 0, "b.jpg")
    dst = _inotify_event(InotifyConstants.IN_MOVED_TO, 8, "a.jpg")
    for event in (lone, src, closed, dst):
        grouper.put_event(event)
    assert grouper.get_queued_moved_from_event(8) is None  # already paired
    assert grouper.get_queued_moved_from_event(7) is lone
    started = time.monotonic()
    assert grouper.read_event() is lone  # unpaired: delivered only after the delay
    assert time.monotonic() - started >= 0.09
    assert grouper.read_event() is closed
    assert grouper.read_event() == (src, dst)  # at the position of its IN_MOVED_TO
    grouper.close()
    assert grouper.read_event() is None


def test_move_grouper_stays_fast_under_a_flood_of_renames() -> None:
    grouper = inotify_adapter.CookieIndexedMoveGrouper()
    started = time.monotonic()
    for cookie in range(1, 20_001):  # nothing read meanwhile: the queue only grows
        grouper.put_event(_inotify_event(InotifyConstants.IN_MOVED_FROM, cookie, f"{cookie}.part"))
        grouper.put_event(_inotify_event(InotifyConstants.IN_MOVED_TO, cookie, f"{cookie}.jpg"))
    pairs = [grouper.read_event() for _ in range(20_000)]
    assert all(isinstance(p, tuple) for p in pairs)
    assert time.monotonic() - started < 5.0  # watchdog's own grouper is quadratic here


def test_a_hung_network_root_does_not_stop_the_others_from_settling(
    rec: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phicapd.pipeline.remote_stats as remote_stats
    import phicapd.pipeline.watch_events as watch_events

    local, nas = tmp_path / "local", tmp_path / "nas"
    for d in (local, nas):
        d.mkdir()
    monkeypatch.setattr(remote_stats, "REMOTE_STAT_SECONDS", 0.3)
    hang = threading.Event()
    real = remote_stats.file_signature

    def stat(path):  # a hard-mounted NFS share that stopped answering
        if Path(path).is_relative_to(nas) and hang.is_set():
            time.sleep(3)
        return real(path)

    monkeypatch.setattr(remote_stats, "file_signature", stat)
    monkeypatch.setattr(watch_events, "file_signature", stat)
    w = make_watcher(rec, [WatchRoot(path=local, poll=False), WatchRoot(path=nas, poll=True)])
    w.start()
    try:
        hang.set()
        (nas / "stuck.jpg").write_bytes(b"x" * 10)
        rec.wait_for(lambda r: w.unresponsive_roots() == [str(nas)], timeout=10)
        started = time.monotonic()
        (local / "fine.jpg").write_bytes(b"y" * 10)
        rec.wait_for(lambda r: "fine.jpg" in r.ready_names(), timeout=10)
        assert time.monotonic() - started < 2  # not behind the hung stats
        assert time.monotonic() - w.last_progress < 1.5  # the watchdog still sees progress
        hang.clear()  # the share answers again
        rec.wait_for(lambda r: "stuck.jpg" in r.ready_names(), timeout=15)
        rec.wait_for(lambda r: w.unresponsive_roots() == [], timeout=5)
    finally:
        w.stop()
