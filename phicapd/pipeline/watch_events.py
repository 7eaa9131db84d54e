"""The watcher's observer-thread half: each filesystem event turned into a settle-table entry,
a rescan request or a rename/removal callback (``Watcher`` inherits it).

These run on watchdog's observer threads, which dispatch while holding watchdog's own lock: they
only update the settle table and the rescan queue under the watcher's short lock and wake the
settle thread, and ``on_gone`` / ``on_moved`` must return at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MOVED,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)

from phicapd.config import WatchRoot
from phicapd.pipeline.paths import is_candidate, is_watched_dir
from phicapd.pipeline.rescans import RescanQueue
from phicapd.pipeline.settle import SettleTable, file_signature
from phicapd.pipeline.watch_observers import RootWatch

log = structlog.get_logger(__name__)


class WatchEvents:
    """Event handling over the watcher's state (set up by ``Watcher.__init__``)."""

    _cond: threading.Condition
    _table: SettleTable
    _rescans: RescanQueue
    _watches: dict[int, RootWatch]
    _clock: Callable[[], float]
    _stopping: bool
    _on_gone: Callable[[Path, WatchRoot], None] | None
    _on_moved: Callable[[Path, Path | None, WatchRoot, bool], None] | None

    def _on_event(self, watch: RootWatch, event: FileSystemEvent) -> None:
        if event.is_synthetic:
            # Contents of a directory that was moved or created as a whole: its rescan covers them.
            return
        if event.is_directory:
            # A directory moved out (full events: empty destination): its pending files are
            # dropped when their stat fails, and its images' captions go (``on_moved``).
            if isinstance(event, DirMovedEvent) and event.src_path:
                self._moved(watch, event.src_path, event.dest_path, directory=True)
            new_dir = event.src_path if event.event_type == EVENT_TYPE_CREATED else event.dest_path
            if event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED) and new_dir:
                self._on_new_dir(watch, Path(os.fsdecode(new_dir)))
            return
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        if isinstance(event, FileMovedEvent):
            if src is not None:
                self._forget(src)
                if not (event.dest_path and self._follows(watch, src)):
                    self._gone(watch, src)  # a paired rename's manifest entry follows it instead
                self._moved(watch, event.src_path, event.dest_path, directory=False)
            if event.dest_path:
                self._on_candidate(watch, Path(os.fsdecode(event.dest_path)))
        elif src is None:
            return
        elif isinstance(event, FileDeletedEvent):
            self._forget(src)
            self._gone(watch, src)
            self._moved(watch, event.src_path, "", directory=False)
        elif isinstance(event, FileClosedEvent):
            self._on_candidate(watch, src)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            if watch.polling:
                self._on_candidate(watch, src)
            else:
                # An open for writing of a file we already know: wait for its next close.
                self._on_change(src, writing=True)
        elif isinstance(event, FileAttribEvent):
            self._on_change(src, writing=False)

    def _on_new_dir(self, watch: RootWatch, directory: Path) -> None:
        if is_watched_dir(directory, watch.root):
            with self._cond:
                self._queue_rescan(watch, directory, "new_dir")

    def _on_candidate(self, watch: RootWatch, path: Path) -> None:
        if not is_candidate(path, watch.root):
            return
        signature = file_signature(path)  # outside the lock: stat may be slow on a busy disk
        first_drop = False
        with self._cond:
            if watch.removed:
                return  # an event that was already on its way when set_roots dropped the root
            if signature is None:
                self._table.discard(path)
            elif self._table.add(path, watch.root, signature, self._clock()):
                self._cond.notify()
            else:
                # Full: drop it and let a scan of the root find it (and whatever else was dropped).
                first_drop = watch.index not in self._rescans.overflowed
                self._rescans.overflowed.add(watch.index)
                self._queue_rescan(watch, watch.root.path, "overflow")
        if first_drop:
            log.warning("settle_table_full", root=str(watch.root.path), limit=self._table.max_entries)

    def _on_change(self, path: Path, *, writing: bool) -> None:
        with self._cond:
            if path not in self._table:
                return
        signature = file_signature(path)
        with self._cond:
            if signature is None:
                self._table.discard(path)
            else:
                self._table.refresh(path, signature, self._clock(), writing=writing)

    def _gone(self, watch: RootWatch, path: Path) -> None:
        if self._on_gone is not None and not watch.removed:
            self._on_gone(path, watch.root)

    def _follows(self, watch: RootWatch, path: Path) -> bool:
        """Is ``path`` an image whose caption may follow it? (Not our own sidecars' temp files,
        renamed into place by the thousand, nor anything else the root does not caption.)"""
        return self._on_moved is not None and is_candidate(path, watch.root)

    def _moved(self, watch: RootWatch, source: bytes | str, target: bytes | str, *, directory: bool) -> None:
        path = Path(os.fsdecode(source))
        if not watch.removed and (self._follows(watch, path) or (directory and self._on_moved is not None)):
            dest = Path(os.fsdecode(target)) if target else None
            self._on_moved(path, dest, watch.root, directory)

    def _forget(self, path: Path) -> None:
        with self._cond:
            self._table.discard(path)

    def _on_inotify_overflow(self) -> None:
        # One inotify instance serves every inotify root and the kernel does not say which
        # watches lost events, so all of them are rescanned.
        with self._cond:
            if self._stopping:
                return
            for watch in self._watches.values():
                if not watch.polling:
                    self._queue_rescan(watch, watch.root.path, "overflow")

    def _queue_rescan(self, watch: RootWatch, directory: Path, reason: str) -> None:
        """Queue a rescan unless it or one of its ancestors is already queued. Caller holds _cond."""
        if not watch.removed and self._rescans.add(watch.index, watch.root.path, directory, reason):
            self._cond.notify()
