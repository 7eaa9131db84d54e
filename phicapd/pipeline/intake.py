"""Intake: the watcher's callbacks and scan requests, turned into journal entries off their threads.

The watcher calls ``file_ready`` and ``rescan`` from its own threads and must never wait on
SQLite or a directory walk. Intake queues both and works them off in threads: one groups
settled files into a single journal transaction, and each root has a scan thread that runs its
reconcile scans one at a time (a root-wide scan makes pending subtree scans of that root
redundant), so a network root that hangs holds up only its own scans.

Files a scan found possibly still being written (modified within the settle time, or stamped in
the future) wait in a settle table, once per path however many scans find them, and are recorded
once their size, mtime and inode stayed unchanged for the settle time: a future mtime settles like
any other, it is never compared with the clock again.

Renames, moves and deletions the watcher saw (``moved``, ``gone``) are carried out in order by
whichever of those threads comes first (``pipeline.moves``), before it records or scans
anything: a renamed image's new path is then found with its caption, not sent to the model.
``set_roots`` changes the
roots while it runs (a configuration reload): work is always done with a root's current
``WatchRoot``, and nothing of a removed root is scanned or queued after it returns (a scan
already under way finishes).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.fsnames import display
from phicapd.log import get_logger
from phicapd.pipeline.reconciler import Reconciler, ScanReport
from phicapd.pipeline.settle import SettleTable, file_signature

log = get_logger(__name__)

_GROUP = 2000


@dataclass(eq=False)
class _ScanLane:
    """One root's scan thread; ``root`` is replaced when the root's settings change."""

    root: WatchRoot
    thread: threading.Thread | None = None
    retired: bool = False  # the root was removed: the thread exits after its current scan


class Intake:
    def __init__(self, reconciler: Reconciler, on_queued: Callable[[], None]) -> None:
        self.reconciler = reconciler
        self._on_queued = on_queued
        # The current roots by path; replaced whole (never changed in place), so reads need no lock.
        self._roots: dict[Path, WatchRoot] = {r.path: r for r in reconciler.settings.watch}
        self._files: collections.deque[tuple[Path, WatchRoot]] = collections.deque()
        self.settle_seconds = reconciler.settings.watcher.settle_seconds
        # Files a scan found still being written, under _files_cond. Unbounded: one entry per
        # file on disk at most, and a dropped one would wait for the next timer scan.
        self._settling = SettleTable(max(self.settle_seconds, 0.05))
        self._files_cond = threading.Condition()
        self._scans: dict[tuple[Path, Path], str] = {}
        self._scan_cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_progress = time.monotonic()
        self.scans_done = 0
        # Per root, the last scan that failed, until a scan of that root covering its directory
        # succeeds: status shows it, so "ready" never hides a root that is not being caught up.
        self._scan_failures: dict[Path, dict[str, object]] = {}
        self.last_scan: ScanReport | None = None
        self._lanes: dict[Path, _ScanLane] = {p: _ScanLane(r) for p, r in self._roots.items()}  # under _scan_cond
        self._scanning: set[_ScanLane] = set()  # lanes with a scan running
        self._started = False
        self._lane_names = iter(range(1 << 62))
        # Files taken off the queues and not yet in the journal: idle() must not say "nothing
        # queued" while they are in neither place.
        self._accepting = False
        # What the watcher saw go or move, in order (under _files_cond), and one drainer at a time.
        self._events: collections.deque[Callable[[], object]] = collections.deque()
        self._draining = threading.Lock()

    def start(self) -> None:
        t = threading.Thread(target=self._files_loop, name="phicapd-intake", daemon=True)
        t.start()
        self._threads.append(t)
        with self._scan_cond:
            self._started = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            self._start_lane(lane)

    def _start_lane(self, lane: _ScanLane) -> None:
        lane.thread = threading.Thread(
            target=self._scan_loop, args=(lane,), name=f"phicapd-scan-{next(self._lane_names)}", daemon=True
        )
        lane.thread.start()
        self._threads.append(lane.thread)

    def set_roots(self, roots: list[WatchRoot]) -> None:
        """Work on exactly ``roots`` from now on, matched by path: a new root gets its scan thread,
        a removed one loses it (after the scan it may be running) along with its queued scans and
        files, and a kept one is scanned and its files recorded with its new ``WatchRoot``."""
        new_lanes: list[_ScanLane] = []
        with self._files_cond, self._scan_cond:
            old, self._roots = self._roots, {r.path: r for r in roots}
            self._files = collections.deque(self._current(self._files))
            for path, root in old.items():
                if path not in self._roots:
                    self._settling.drop_root(path)
                elif self._roots[path] != root:
                    self._settling.replace_root(self._roots[path])
            for path, lane in list(self._lanes.items()):
                if path in self._roots:
                    lane.root = self._roots[path]
                    continue
                lane.retired = True
                del self._lanes[path]
                self._scan_failures.pop(path, None)
                for key in [k for k in self._scans if k[0] == path]:
                    del self._scans[key]
            for path, root in self._roots.items():
                if path not in self._lanes:
                    self._lanes[path] = lane = _ScanLane(root)
                    new_lanes.append(lane)
            started = self._started and not self._stopping.is_set()
            self._threads = [t for t in self._threads if t.is_alive()]
            self._scan_cond.notify_all()
        if started:
            for lane in new_lanes:
                self._start_lane(lane)

    def _current(self, files: Iterable[tuple[Path, WatchRoot]]) -> list[tuple[Path, WatchRoot]]:
        """``files`` of roots still watched, each with its root's current settings."""
        roots = self._roots
        return [(path, roots[root.path]) for path, root in files if root.path in roots]

    def stop(self) -> None:
        self._stopping.set()
        with self._files_cond:
            self._files_cond.notify_all()
        with self._scan_cond:
            self._scan_cond.notify_all()
        for t in self._threads:
            t.join(10)

    # -- the watcher's callbacks ---------------------------------------------------------------

    def file_ready(self, path: Path, root: WatchRoot) -> None:
        with self._files_cond:
            self._files.extend(self._current([(path, root)]))
            self._files_cond.notify()

    def moved(self, source: Path, target: Path | None, root: WatchRoot, directory: bool) -> None:
        """The watcher paired a rename within ``root``; ``target`` None: deleted or moved out."""
        moves = self.reconciler.moves
        current = self._roots.get(root.path, root)
        if directory:
            self._event(lambda: moves.moved_dir(source, target, current))
        elif target is not None:
            self._event(lambda: moves.moved(source, target, current))
        else:
            self._event(lambda: moves.gone(source, current))

    def _event(self, handle: Callable[[], object]) -> None:
        with self._files_cond:
            self._events.append(handle)
            self._files_cond.notify()

    def _drain_events(self) -> None:
        """Carry out the moves and deletions seen so far, in order (one thread at a time)."""
        with self._draining:
            while True:
                with self._files_cond:
                    if not self._events:
                        return
                    handle = self._events[0]
                try:
                    handle()
                except Exception:
                    log.exception("cannot carry out a rename or deletion")
                finally:
                    with self._files_cond:
                        self._events.popleft()

    def rescan(self, root: WatchRoot, directory: Path | None = None, reason: str = "request") -> None:
        directory = directory or root.path
        with self._scan_cond:
            if root.path not in self._lanes:
                log.info("scan of a root no longer watched dropped", root=str(root.path), reason=reason)
                return
            if (root.path, root.path) in self._scans:
                return  # a whole-root scan is already queued
            if directory == root.path:
                for key in [k for k in self._scans if k[0] == root.path]:
                    del self._scans[key]
            self._scans[(root.path, directory)] = reason
            self._scan_cond.notify_all()

    def defer(self, files: list[tuple[Path, WatchRoot]]) -> None:
        """Record these files once they stayed unchanged for the settle time. A file already
        settling keeps its clock (a change since is seen when it is due), never a second entry."""
        files = self._current(files)
        signatures = [file_signature(path) for path, _ in files]  # outside the lock: a stat may be slow
        now = time.monotonic()
        with self._files_cond:
            for (path, root), signature in zip(files, signatures, strict=True):
                if signature is not None and path not in self._settling:
                    self._settling.add(path, root, signature, now)
            self._files_cond.notify()

    def idle(self) -> bool:
        """Nothing queued and no scan running (tests and benchmarks wait for this)."""
        with self._files_cond, self._scan_cond:
            return (
                not self._files
                and not self._events
                and not self._settling
                and not self._accepting
                and not self._scans
                and not self._scanning
            )

    def scan_failures(self) -> list[dict[str, object]]:
        """The roots whose last scan failed (and none covering it succeeded since): root,
        directory, when (wall clock), why it ran, and the error."""
        with self._scan_cond:
            failures = [dict(f) for f in self._scan_failures.values()]
        for f in failures:
            del f["directory_path"]
        return failures

    def backlog(self) -> dict[str, int]:
        with self._files_cond, self._scan_cond:
            return {
                "settled_files": len(self._files),
                "settling_files": len(self._settling),
                "scans": len(self._scans) + len(self._scanning),
            }

    # -- workers -------------------------------------------------------------------------------

    def _files_loop(self) -> None:
        while not self._stopping.is_set():
            with self._files_cond:
                while not self._files and not self._events and not self._settled_due() and not self._stopping.is_set():
                    self.last_progress = time.monotonic()
                    deadline = self._settling.next_deadline()
                    wait = deadline - time.monotonic() if deadline is not None else 1.0
                    self._files_cond.wait(min(1.0, max(0.01, wait)))
                group = [self._files.popleft() for _ in range(min(len(self._files), _GROUP))]
                due = self._settling.due(time.monotonic(), _GROUP)
                self._accepting = bool(group or due)
            try:
                self._drain_events()  # a renamed image's caption moves before its new path is judged
                group += self._settle(due)
                if group and self.reconciler.accept(group):
                    self._on_queued()
            except Exception:
                # The files are not lost: the next reconcile scan finds them again.
                log.exception("cannot record settled files", files=len(group))
            finally:
                with self._files_cond:
                    self._accepting = False
            self.last_progress = time.monotonic()

    def _settled_due(self) -> bool:
        deadline = self._settling.next_deadline()
        return deadline is not None and deadline <= time.monotonic()

    def _settle(self, due: list[tuple[Path, int]]) -> list[tuple[Path, WatchRoot]]:
        """Of the due settling files, those unchanged since the last look (the others wait on)."""
        signatures = [file_signature(path) for path, _ in due]  # outside the lock
        now = time.monotonic()
        with self._files_cond:
            checked = [
                (path, self._settling.check(path, gen, sig, now))
                for (path, gen), sig in zip(due, signatures, strict=True)
            ]
        return [(path, root) for path, root in checked if root is not None]

    def _scan_loop(self, lane: _ScanLane) -> None:
        while not self._stopping.is_set():
            with self._scan_cond:
                while not self._stopping.is_set() and not lane.retired:
                    if mine := [k for k in self._scans if k[0] == lane.root.path]:
                        break
                    self._scan_cond.wait(1.0)
                if self._stopping.is_set() or lane.retired:
                    return
                root = lane.root
                directory = mine[0][1]
                reason = self._scans.pop(mine[0])
                self._scanning.add(lane)
            try:
                self._drain_events()  # a renamed directory's journal follows it before it is scanned
                report = self.reconciler.scan(root, directory, reason)
                self.last_scan = report
                self.scans_done += 1
                if report.deferred:
                    self.defer([(p, root) for p in report.deferred])
                if report.queued:
                    self._on_queued()
                with self._scan_cond:
                    failed = self._scan_failures.get(root.path)
                    if failed is not None and Path(str(failed["directory_path"])).is_relative_to(directory):
                        del self._scan_failures[root.path]
            except Exception as e:
                log.exception("scan failed", root=display(root.path), directory=display(directory))
                with self._scan_cond:
                    self._scan_failures[root.path] = {
                        "root": display(root.path),
                        "directory": display(directory),
                        "directory_path": directory,
                        "at": time.time(),
                        "reason": reason,
                        "error": display(f"{type(e).__name__}: {e}"),
                    }
            finally:
                with self._scan_cond:
                    self._scanning.discard(lane)
