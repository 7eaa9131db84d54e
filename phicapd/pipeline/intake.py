"""Intake: the watcher's callbacks and scan requests, turned into journal entries off their threads.

The watcher calls ``file_ready`` and ``rescan`` from its own threads and must never wait on
SQLite or a directory walk. Intake queues both and works them off in threads: one groups
settled files into a single journal transaction, and each root has a scan thread that runs its
reconcile scans one at a time (a root-wide scan makes pending subtree scans of that root
redundant), so a network root that hangs holds up only its own scans.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from collections.abc import Callable
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.log import get_logger
from phicapd.pipeline.scanner import Reconciler, ScanReport

log = get_logger(__name__)

_GROUP = 2000


class Intake:
    def __init__(self, reconciler: Reconciler, on_queued: Callable[[], None]) -> None:
        self.reconciler = reconciler
        self._on_queued = on_queued
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
        self._scanning: set[Path] = set()  # roots with a scan running
        # Files taken off the queues and not yet in the journal: idle() must not say "nothing
        # queued" while they are in neither place.
        self._accepting = False

    def start(self) -> None:
        t = threading.Thread(target=self._files_loop, name="phicapd-intake", daemon=True)
        t.start()
        self._threads.append(t)
        for i, root in enumerate(self.reconciler.settings.watch):
            t = threading.Thread(target=self._scan_loop, args=(root,), name=f"phicapd-scan-{i}", daemon=True)
            t.start()
            self._threads.append(t)

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
            self._files.append((path, root))
            self._files_cond.notify()

    def rescan(self, root: WatchRoot, directory: Path | None = None, reason: str = "request") -> None:
        directory = directory or root.path
        with self._scan_cond:
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
            for path, root in files:
                self._seq += 1
                heapq.heappush(self._deferred, (due, self._seq, path, root))
            self._files_cond.notify()

    def idle(self) -> bool:
        """Nothing queued and no scan running (tests and benchmarks wait for this)."""
        with self._files_cond, self._scan_cond:
            return (
                not self._files
                and not self._deferred
                and not self._accepting
                and not self._scans
                and not self._scanning
            )

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
                self._accepting = bool(group or due)
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
            finally:
                with self._files_cond:
                    self._accepting = False
            self.last_progress = time.monotonic()

    def _due(self) -> bool:
        return bool(self._deferred) and self._deferred[0][0] <= time.monotonic()

    def _scan_loop(self, root: WatchRoot) -> None:
        while not self._stopping.is_set():
            with self._scan_cond:
                while not self._stopping.is_set() and not (mine := [k for k in self._scans if k[0] == root.path]):
                    self._scan_cond.wait(1.0)
                if self._stopping.is_set():
                    return
                directory = mine[0][1]
                reason = self._scans.pop(mine[0])
                self._scanning.add(root.path)
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
                    self._scanning.discard(root.path)
