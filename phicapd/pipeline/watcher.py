"""The Watcher: filesystem events under the watched roots, turned into two callbacks.

* ``on_ready(path, root)``: an image was closed after writing or moved in, and its
  (size, mtime_ns, inode) then stayed unchanged for ``settle_seconds`` (``settle.py``).
* ``on_moved(source, target, root, directory)``: a file or directory was renamed within ``root``
  (inotify's two halves of a rename, paired by cookie in ``inotify_adapter.py``), or deleted or
  moved out of it (``target`` None). A renamed file's new path is also a candidate as above, and
  ``on_gone`` (the manifest drops a file) is not called for its old one: its outputs and caption
  follow it (``pipeline.moves``).
* ``on_rescan(root, directory, reason)``: events may have been missed, so the caller should
  reconcile ``directory`` against the journal. Reasons: ``"new_dir"`` (a directory appeared; files
  that landed in it before its watch existed raised no event), ``"overflow"`` (the kernel's inotify
  queue or our settle table overflowed), ``"timer"`` (the periodic safety net),
  ``"observer_error"`` (an observer or a root's watch died and was re-established) and
  ``"reload"`` (``set_roots`` added a root, or changed which files one captions).

Rules:

* Events are hints; the scan is the truth.
* Every callback runs on the watcher's own settle thread, never on a watchdog thread and never
  under a lock that a watchdog thread needs: watchdog's observer dispatches events while holding
  its own lock, so the event handlers here only update the settle table under a short lock and
  wake the settle thread.
* inotify is the default (``inotify_adapter.py``, the one module that touches watchdog's
  internals). Roots with ``poll = true``, or with ``poll`` unset on a network filesystem
  (``mounts.py``), use watchdog's ``PollingObserver``, which has no close events: there a created
  or modified file is a candidate and the settle time alone decides.
* Observers and watches are (re)started only by ``start()``, ``set_roots`` and the settle
  thread's health check, one at a time (``_observing``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from phicapd.config import WatcherSettings, WatchRoot
from phicapd.pipeline.inotify_adapter import (
    INOTIFY_LOGGER,
    TESTED_WATCHDOG,
    OverflowLogHandler,
    internals_problems,
    make_inotify_observer,
    observer_alive,
    watchdog_version,
)
from phicapd.pipeline.mounts import needs_polling
from phicapd.pipeline.paths import is_candidate, is_watched_dir
from phicapd.pipeline.settle import SettleTable, file_signature

log = structlog.get_logger(__name__)

#: How often the settle thread checks that observers and their watches are alive.
HEALTH_CHECK_SECONDS = 1.0
#: Longest sleep of the settle thread, so that ``last_progress`` stays fresh when idle.
MAX_IDLE_SECONDS = 1.0
#: Most directories waiting to be rescanned; beyond it a root's requests collapse into one.
MAX_QUEUED_RESCANS = 10_000
#: Most files waiting to settle; beyond it new candidates are dropped and their root is rescanned.
MAX_PENDING = 100_000
#: How long stop() waits for each thread (they are daemon threads: none blocks the exit).
STOP_TIMEOUT_SECONDS = 10.0
#: How long the settle thread waits for the stats of files on polled (network) roots: a hung
#: NFS or SMB mount must not stop every other root from settling (nor the watchdog's pings).
REMOTE_STAT_SECONDS = 5.0
REMOTE_STAT_THREADS = 4


RESCAN_REASONS = ("new_dir", "overflow", "timer", "observer_error", "reload")

#: The only events ``Watcher._on_event`` acts on. Scheduling with this filter keeps IN_OPEN and
#: IN_CLOSE_NOWRITE out of the inotify mask (every read of an image, by us or anyone, and every
#: directory listing raised them) and stops watchdog from building and queueing the
#: DirModifiedEvent it adds to nearly every event, none of which we need.
HANDLED_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


_UNANSWERED = object()  # a stat that did not return in time


# ---------------------------------------------------------------------------------------------
# Observers


@dataclass
class _RootWatch:
    index: int
    root: WatchRoot
    polling: bool
    observed: ObservedWatch | None = None  # None while its directory cannot be watched
    failing: bool = False  # the last attempt to watch it failed (logged once per outage)
    removed: bool = False  # set_roots dropped it: its late events are ignored


class _RootEventHandler(FileSystemEventHandler):
    """Hands every event of one root to the watcher; runs on the observer's thread."""

    def __init__(self, watcher: Watcher, watch: _RootWatch) -> None:
        self._watcher = watcher
        self._watch = watch

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(self._watch, event)
        except Exception:
            # An exception here would kill the observer thread, and with it every root.
            log.exception("watch_event_failed", event=repr(event))


class Watcher:
    """Watches the roots and calls ``on_ready`` / ``on_rescan`` from its settle thread."""

    def __init__(
        self,
        roots: list[WatchRoot],
        settings: WatcherSettings,
        *,
        on_ready: Callable[[Path, WatchRoot], None],
        on_rescan: Callable[[WatchRoot, Path, str], None],
        on_gone: Callable[[Path, WatchRoot], None] | None = None,
        on_moved: Callable[[Path, Path | None, WatchRoot, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._on_ready = on_ready
        self._on_rescan = on_rescan
        # A file deleted or moved away (observer thread; it must return at once): the
        # metadata.jsonl manifest drops it.
        self._on_gone = on_gone
        self._on_moved = on_moved  # a paired rename (observer thread too: it must return at once)
        self._clock = clock
        self._indexes = itertools.count()
        # By index. Changed under _cond; iterated by the settle thread under _cond or _observing.
        self._watches: dict[int, _RootWatch] = {}
        for root in roots:
            watch = _RootWatch(next(self._indexes), root, needs_polling(root))
            self._watches[watch.index] = watch
        self._observers: dict[bool, BaseObserver] = {}  # by "polling"
        self._handlers = {w.index: _RootEventHandler(self, w) for w in self._watches.values()}
        self._overflow_handler = OverflowLogHandler(self._on_inotify_overflow)
        # Held while observers are started and watches (un)scheduled: by start(), set_roots and
        # the settle thread's health check. Taken before _cond, never from an observer thread.
        self._observing = threading.Lock()

        # Guards the settle table and the rescan queue; never held while calling out.
        self._cond = threading.Condition(threading.Lock())
        self._table = SettleTable(settings.settle_seconds, MAX_PENDING)
        # Ready files taken out of the table but not yet handed to on_ready: still pending, or a
        # caller waiting for pending() == 0 could see nothing anywhere while one is in between.
        self._handing_over = 0
        self._rescans: dict[tuple[int, Path], str] = {}  # insertion-ordered, deduplicated
        self._table_overflowed: set[int] = set()  # roots with an overflow rescan owed
        self._started = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_progress = clock()
        self._next_timer: float | None = None
        self._next_health_check = 0.0
        self._remote_stats: ThreadPoolExecutor | None = None  # made on first use
        self._unresponsive: set[Path] = set()  # polled roots whose last stats did not answer

    # -- public API ------------------------------------------------------------------------

    @property
    def last_progress(self) -> float:
        return self._last_progress

    def pending(self) -> int:
        with self._cond:
            return len(self._table) + self._handing_over

    def start(self) -> None:
        with self._observing:
            with self._cond:
                if self._started or self._stopping:
                    raise RuntimeError("a Watcher starts once and cannot restart after stop()")
                self._started = True
                watches = list(self._watches.values())
            self._install_overflow_handler()
            for watch in watches:
                self._schedule(watch, rescan_on_success=False)
        now = self._clock()
        interval = self._settings.rescan_interval_seconds
        self._next_timer = now + interval if interval > 0 else None
        self._next_health_check = now + HEALTH_CHECK_SECONDS
        self._thread = threading.Thread(target=self._run, name="phicapd-watcher", daemon=True)
        self._thread.start()
        if not all(w.polling for w in watches) and (problems := internals_problems()):
            # The test suite fails on this; a watchdog installed outside the pin gets the reason.
            log.error(
                "watchdog_not_as_tested",
                version=watchdog_version(),
                tested=TESTED_WATCHDOG,
                problems=problems,
            )
        log.info(
            "watcher_started",
            roots=[str(w.root.path) for w in watches],
            polling=[str(w.root.path) for w in watches if w.polling],
        )

    def set_roots(self, roots: list[WatchRoot]) -> None:
        """Watch exactly ``roots`` from now on (a configuration reload); roots are matched by path.

        A new root is watched and a scan of it is requested (reason ``"reload"``); a dropped
        one is no longer watched and its files waiting to settle are forgotten; a root whose
        settings changed is judged with the new ``WatchRoot`` from now on, watched anew when
        ``recursive`` or ``poll`` changed, and rescanned when what it captions changed. Returns
        once the new watches are in place (a file written after it returns raises events);
        safe to call from any thread, before ``start()`` as well.
        """
        wanted = {root.path: root for root in roots}
        with self._observing:
            with self._cond:
                if self._stopping:
                    return
                current = {w.root.path: w for w in self._watches.values()}
            # Mount detection reads /proc: done before _cond is taken.
            fresh = [root for path, root in wanted.items() if path not in current]
            added = [_RootWatch(next(self._indexes), root, needs_polling(root)) for root in fresh]
            rewatch: list[_RootWatch] = []
            rescan: list[_RootWatch] = list(added)
            with self._cond:
                for watch in added:
                    self._watches[watch.index] = watch
                    self._handlers[watch.index] = _RootEventHandler(self, watch)
                removed = [w for p, w in current.items() if p not in wanted]
                for watch in removed:
                    self._forget_watch(watch)
                changed = [(w, wanted[p]) for p, w in current.items() if p in wanted and w.root != wanted[p]]
                for watch, root in changed:
                    old, watch.root = watch.root, root
                    self._table.replace_root(root)
                    if (old.recursive, old.poll) != (root.recursive, root.poll):
                        rewatch.append(watch)
                    if _captions_differently(old, root):
                        rescan.append(watch)
                started = self._started
            if started:
                for watch in removed + rewatch:
                    self._unschedule(watch)
                polling = {w.index: needs_polling(w.root) for w in rewatch}
                with self._cond:  # _signatures reads it under _cond
                    for watch in rewatch:
                        watch.polling = polling[watch.index]
                for watch in added + rewatch:
                    self._schedule(watch, rescan_on_success=False)
                self._install_overflow_handler()
                with self._cond:
                    for watch in rescan:
                        self._queue_rescan(watch, watch.root.path, "reload")
        if added or removed or changed:
            log.info(
                "watch_roots_changed",
                added=[str(w.root.path) for w in added],
                removed=[str(w.root.path) for w in removed],
                changed=[str(w.root.path) for w, _ in changed],
            )

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        # The settle thread goes first: it may be (re)starting observers. It stops between two
        # callbacks; a callback stuck for longer is reported, not waited for forever.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                log.error("watcher_thread_stuck_in_callback", waited_s=STOP_TIMEOUT_SECONDS)
        with self._observing:  # a set_roots under way finishes first; none starts after this
            logging.getLogger(INOTIFY_LOGGER).removeHandler(self._overflow_handler)
            observers = list(self._observers.values())
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(STOP_TIMEOUT_SECONDS)  # a poll stuck on a dead network mount stays behind
        if self._remote_stats is not None:
            self._remote_stats.shutdown(wait=False, cancel_futures=True)  # so may a stat
        log.info("watcher_stopped")

    # -- events (observer threads) ---------------------------------------------------------

    def _on_event(self, watch: _RootWatch, event: FileSystemEvent) -> None:
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

    def _on_new_dir(self, watch: _RootWatch, directory: Path) -> None:
        if is_watched_dir(directory, watch.root):
            with self._cond:
                self._queue_rescan(watch, directory, "new_dir")

    def _on_candidate(self, watch: _RootWatch, path: Path) -> None:
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
                first_drop = watch.index not in self._table_overflowed
                self._table_overflowed.add(watch.index)
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

    def _gone(self, watch: _RootWatch, path: Path) -> None:
        if self._on_gone is not None and not watch.removed:
            self._on_gone(path, watch.root)

    def _follows(self, watch: _RootWatch, path: Path) -> bool:
        """Is ``path`` an image whose caption may follow it? (Not our own sidecars' temp files,
        renamed into place by the thousand, nor anything else the root does not caption.)"""
        return self._on_moved is not None and is_candidate(path, watch.root)

    def _moved(self, watch: _RootWatch, source: bytes | str, target: bytes | str, *, directory: bool) -> None:
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

    def _queue_rescan(self, watch: _RootWatch, directory: Path, reason: str) -> None:
        """Queue a rescan unless it or one of its ancestors is already queued. Caller holds _cond."""
        if watch.removed:
            return
        for queued in (directory, *directory.parents):
            if (watch.index, queued) in self._rescans:
                return
            if queued == watch.root.path:
                break
        if len(self._rescans) >= MAX_QUEUED_RESCANS:  # a flood of new directories
            directory, reason = watch.root.path, "overflow"
        if directory == watch.root.path:  # a whole-root scan covers its queued subdirectories
            for key in [k for k in self._rescans if k[0] == watch.index]:
                del self._rescans[key]
        self._rescans[(watch.index, directory)] = reason
        self._cond.notify()

    # -- the settle thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:
                # Nothing may kill this thread: without it no file is ever ready again.
                log.exception("watcher_loop_failed")
                with self._cond:
                    self._cond.wait(MAX_IDLE_SECONDS)

    def _iterate(self) -> None:
        with self._cond:
            if self._stopping:
                return
            now = self._clock()
            self._last_progress = now
            rescans = self._take_rescans()
            due = self._table.due(now)
        self._deliver_rescans(rescans)
        self._settle(due)
        self._run_timer()
        self._check_observers()
        with self._cond:
            if not self._stopping and not self._rescans and not due:
                self._cond.wait(self._idle_timeout())

    def _forget_watch(self, watch: _RootWatch) -> None:
        """Drop a root that set_roots removed: its queued rescans and pending files. Caller holds _cond."""
        watch.removed = True
        del self._watches[watch.index]
        del self._handlers[watch.index]
        for key in [k for k in self._rescans if k[0] == watch.index]:
            del self._rescans[key]
        self._table_overflowed.discard(watch.index)
        self._table.drop_root(watch.root.path)

    def _take_rescans(self) -> list[tuple[_RootWatch, Path, str]]:
        out = [(self._watches[i], directory, reason) for (i, directory), reason in self._rescans.items()]
        self._rescans.clear()
        for watch, _, reason in out:
            if reason == "overflow":
                self._table_overflowed.discard(watch.index)
        return out

    def _idle_timeout(self) -> float:
        now = self._clock()
        wake = now + MAX_IDLE_SECONDS
        for moment in (self._table.next_deadline(), self._next_timer, self._next_health_check):
            if moment is not None:
                wake = min(wake, moment)
        return max(0.0, wake - now)

    def _deliver_rescans(self, rescans: list[tuple[_RootWatch, Path, str]]) -> None:
        for watch, directory, reason in rescans:
            if self._stopping:
                return
            log.info("rescan_requested", root=str(watch.root.path), directory=str(directory), reason=reason)
            try:
                self._on_rescan(watch.root, directory, reason)
            except Exception:
                log.exception("on_rescan_failed", directory=str(directory), reason=reason)

    def _settle(self, due: list[tuple[Path, int]]) -> None:
        if not due:
            return
        signatures = self._signatures([path for path, _ in due])
        with self._cond:
            now = self._clock()
            ready = []
            for (path, generation), signature in zip(due, signatures, strict=True):
                if signature is _UNANSWERED:
                    self._table.later(path, generation, now)
                elif (root := self._table.check(path, generation, signature, now)) is not None:  # type: ignore[arg-type]
                    ready.append((path, root))
            self._handing_over += len(ready)
        try:
            for path, root in ready:
                if self._stopping:
                    return  # the start-up scan of the next run finds it
                try:
                    self._on_ready(path, root)
                except Exception:
                    log.exception("on_ready_failed", path=str(path))
        finally:
            with self._cond:
                self._handing_over -= len(ready)

    def _signatures(self, paths: list[Path]) -> list[object]:
        """Each file's signature (``Signature | None``); files on polled roots are stated in a
        small pool, and those that do not answer within ``REMOTE_STAT_SECONDS`` come back
        ``_UNANSWERED``."""
        with self._cond:
            remote = {w.root.path for w in self._watches.values() if w.polling}
        owners = [self._polled_root(path, remote) for path in paths] if remote else []
        if not any(owners):  # no polled root has a file here: plain stats, no pool
            return [file_signature(path) for path in paths]
        if self._remote_stats is None:
            self._remote_stats = ThreadPoolExecutor(REMOTE_STAT_THREADS, thread_name_prefix="phicapd-remote-stat")
        pool = self._remote_stats
        pending = [pool.submit(file_signature, p) if o else None for p, o in zip(paths, owners, strict=True)]
        deadline = time.monotonic() + REMOTE_STAT_SECONDS
        out: list[object] = []
        hung: set[Path] = set()
        for path, owner, future in zip(paths, owners, pending, strict=True):
            if future is None:
                out.append(file_signature(path))
                continue
            try:
                out.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                out.append(_UNANSWERED)
                hung.add(owner)  # type: ignore[arg-type]
        answered = {o for o in owners if o is not None} - hung
        for root in hung - self._unresponsive:
            log.error("watch_root_unresponsive", root=str(root), waited_s=REMOTE_STAT_SECONDS)
        for root in answered & self._unresponsive:
            log.info("watch_root_responsive_again", root=str(root))
        self._unresponsive = (self._unresponsive | hung) - answered
        return out

    @staticmethod
    def _polled_root(path: Path, remote: set[Path]) -> Path | None:
        for parent in path.parents:
            if parent in remote:
                return parent
        return None

    def unresponsive_roots(self) -> list[str]:
        """Polled roots whose last file stats did not answer (a hung network mount)."""
        return sorted(str(r) for r in self._unresponsive)

    def _run_timer(self) -> None:
        if self._next_timer is None or self._clock() < self._next_timer:
            return
        self._next_timer = self._clock() + self._settings.rescan_interval_seconds
        with self._cond:
            for watch in self._watches.values():
                self._queue_rescan(watch, watch.root.path, "timer")

    # -- observer health (settle thread, and start()) --------------------------------------

    def _observer_for(self, polling: bool) -> BaseObserver:
        observer = self._observers.get(polling)
        if observer is None:
            if polling:
                observer = PollingObserver(timeout=self._settings.poll_interval_seconds)
            else:
                observer = make_inotify_observer(self._on_inotify_overflow)
            observer.start()
            self._observers[polling] = observer
        return observer

    def _schedule(self, watch: _RootWatch, *, rescan_on_success: bool) -> None:
        try:
            observer = self._observer_for(watch.polling)
            watch.observed = observer.schedule(
                self._handlers[watch.index],
                str(watch.root.path),
                recursive=watch.root.recursive,
                event_filter=HANDLED_EVENTS,
            )
        except OSError as e:
            if not watch.polling and e.errno in (errno.ENOSPC, errno.EMFILE):
                # Out of inotify watches or instances: polling still works, just slower.
                log.warning("inotify_limit_reached_polling_instead", root=str(watch.root.path), error=str(e))
                watch.polling = True
                self._schedule(watch, rescan_on_success=rescan_on_success)
                return
            if not watch.failing:
                log.error("watch_root_unavailable", root=str(watch.root.path), error=str(e))
            watch.failing = True
            return
        if watch.failing:
            log.info("watch_root_restored", root=str(watch.root.path))
        watch.failing = False
        if rescan_on_success:
            with self._cond:
                self._queue_rescan(watch, watch.root.path, "observer_error")

    def _unschedule(self, watch: _RootWatch) -> None:
        observer = self._observers.get(watch.polling)
        if watch.observed is not None and observer is not None:
            with contextlib.suppress(KeyError):
                observer.unschedule(watch.observed)
        watch.observed = None

    def _check_observers(self) -> None:
        now = self._clock()
        if now < self._next_health_check:
            return
        if not self._observing.acquire(blocking=False):
            return  # set_roots is (un)scheduling watches: check again next time
        try:
            self._next_health_check = now + HEALTH_CHECK_SECONDS
            self._check_observers_locked()
        finally:
            self._observing.release()

    def _check_observers_locked(self) -> None:
        for polling, observer in list(self._observers.items()):
            if not observer_alive(observer):
                log.error("observer_died_restarting", polling=polling)
                with contextlib.suppress(Exception):
                    observer.stop()  # stops its emitters, if any still run
                del self._observers[polling]
                for watch in self._watches.values():
                    if watch.polling == polling:
                        watch.observed = None
        for watch in list(self._watches.values()):
            if watch.observed is not None and not self._emitter_alive(watch):
                # The root was deleted or its emitter crashed; watchdog stops watching it.
                log.warning("watch_lost", root=str(watch.root.path))
                self._unschedule(watch)
            if watch.observed is None:
                self._schedule(watch, rescan_on_success=True)

    def _emitter_alive(self, watch: _RootWatch) -> bool:
        observer = self._observers.get(watch.polling)
        if observer is None:
            return False
        return any(e.watch == watch.observed and e.is_alive() for e in list(observer.emitters))

    def _install_overflow_handler(self) -> None:
        # addHandler adds a handler once, however often it is called (set_roots calls it again).
        if not all(w.polling for w in list(self._watches.values())):
            logging.getLogger(INOTIFY_LOGGER).addHandler(self._overflow_handler)


def _captions_differently(old: WatchRoot, new: WatchRoot) -> bool:
    """Would a scan of the root find other work under ``new``? (Not so for a new prompt, prefix or
    suffix: those apply to the captions made from now on.)"""
    same = {"prompt", "prefix", "suffix", "on_delete"}
    return old.model_dump(exclude=same) != new.model_dump(exclude=same)
