"""Intake: the watcher's callbacks and scan requests, turned into journal entries off their threads.

The watcher calls ``file_ready`` and ``rescan`` from its own threads and must never wait on
SQLite or a directory walk. Intake queues both and works them off in threads: one groups
settled files into a single journal transaction, and each root has a scan thread that runs its
reconcile scans one at a time (a root-wide scan makes pending subtree scans of that root
redundant), so a network root that hangs holds up only its own scans. ``set_roots`` changes the
roots while it runs (a configuration reload): work is always done with a root's current
``WatchRoot``, and nothing of a removed root is scanned or queued after it returns (a scan
already under way finishes).
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.log import get_logger
from phicapd.pipeline.scanner import Reconciler, ScanReport

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
        # Files a scan found still being written: (due, seq, path, root), checked again when due.
        self._deferred: list[tuple[float, int, Path, WatchRoot]] = []
        self._seq = 0
        self.settle_seconds = reconciler.settings.watcher.settle_seconds
        self._files_cond = threading.Condition()
        self._scans: dict[tuple[Path, Path], str] = {}
        self._scan_cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_progress = time.monotonic()
        self.scans_done = 0
        self.last_scan: ScanReport | None = None
        self._lanes: dict[Path, _ScanLane] = {p: _ScanLane(r) for p, r in self._roots.items()}  # under _scan_cond
        self._scanning: set[_ScanLane] = set()  # lanes with a scan running
        self._started = False
        self._lane_names = iter(range(1 << 62))

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
            self._roots = {r.path: r for r in roots}
            self._files = collections.deque(self._current(self._files))
            roots = self._roots
            self._deferred = [(due, seq, p, roots[r.path]) for due, seq, p, r in self._deferred if r.path in roots]
            heapq.heapify(self._deferred)
            for path, lane in list(self._lanes.items()):
                if path in self._roots:
                    lane.root = self._roots[path]
                    continue
                lane.retired = True
                del self._lanes[path]
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
        """Check these files again once they had time to settle."""
        due = time.monotonic() + max(self.settle_seconds, 0.05)
        with self._files_cond:
            for path, root in self._current(files):
                self._seq += 1
                heapq.heappush(self._deferred, (due, self._seq, path, root))
            self._files_cond.notify()

    def idle(self) -> bool:
        """Nothing queued and no scan running (tests and benchmarks wait for this)."""
        with self._files_cond, self._scan_cond:
            return not self._files and not self._deferred and not self._scans and not self._scanning

    def backlog(self) -> dict[str, int]:
        with self._files_cond, self._scan_cond:
            return {
                "settled_files": len(self._files),
                "settling_files": len(self._deferred),
                "scans": len(self._scans) + len(self._scanning),
            }

    # -- workers -------------------------------------------------------------------------------

    def _files_loop(self) -> None:
        while not self._stopping.is_set():
            with self._files_cond:
                while not self._files and not self._due() and not self._stopping.is_set():
                    self.last_progress = time.monotonic()
                    wait = self._deferred[0][0] - time.monotonic() if self._deferred else 1.0
                    self._files_cond.wait(min(1.0, max(0.01, wait)))
                group = [self._files.popleft() for _ in range(min(len(self._files), _GROUP))]
                due = []
                while self._due() and len(due) < _GROUP:
                    _, _, path, root = heapq.heappop(self._deferred)
                    due.append((path, root))
            try:
                queued = 0
                if group:
                    queued += self.reconciler.accept(group)[0]
                if due:
                    n, young = self.reconciler.accept(due, young_after=time.time() - self.settle_seconds)
                    queued += n
                    if young:
                        self.defer(young)
                if queued:
                    self._on_queued()
            except Exception:
                # The files are not lost: the next reconcile scan finds them again.
                log.exception("cannot record settled files", files=len(group) + len(due))
            self.last_progress = time.monotonic()

    def _due(self) -> bool:
        return bool(self._deferred) and self._deferred[0][0] <= time.monotonic()

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
                report = self.reconciler.scan(root, directory, reason)
                self.last_scan = report
                self.scans_done += 1
                if report.deferred:
                    self.defer([(p, root) for p in report.deferred])
                if report.queued:
                    self._on_queued()
            except Exception:
                log.exception("scan failed", root=str(root.path), directory=str(directory))
            finally:
                with self._scan_cond:
                    self._scanning.discard(lane)
