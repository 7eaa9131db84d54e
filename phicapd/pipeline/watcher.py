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

This module is the lifecycle and the settle thread. Beside it: the event handlers of the
observer threads (``watch_events``), the observers and the roots' watches on them
(``watch_observers``), the rescan queue (``rescans``) and the stats that a hung network mount
cannot stop (``remote_stats``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from phicapd.config import WatcherSettings, WatchRoot
from phicapd.pipeline.inotify_adapter import TESTED_WATCHDOG, internals_problems, watchdog_version
from phicapd.pipeline.mounts import needs_polling
from phicapd.pipeline.remote_stats import UNANSWERED, RemoteStats
from phicapd.pipeline.rescans import RescanQueue
from phicapd.pipeline.settle import SettleTable
from phicapd.pipeline.watch_events import WatchEvents
from phicapd.pipeline.watch_observers import Observers, RootEventHandler, RootWatch

log = structlog.get_logger(__name__)

#: How often the settle thread checks that observers and their watches are alive.
HEALTH_CHECK_SECONDS = 1.0
#: Longest sleep of the settle thread, so that ``last_progress`` stays fresh when idle.
MAX_IDLE_SECONDS = 1.0
#: Most files waiting to settle; beyond it new candidates are dropped and their root is rescanned.
MAX_PENDING = 100_000
#: How long stop() waits for each thread (they are daemon threads: none blocks the exit).
STOP_TIMEOUT_SECONDS = 10.0


RESCAN_REASONS = ("new_dir", "overflow", "timer", "observer_error", "reload")


class Watcher(WatchEvents):
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
        self._watches: dict[int, RootWatch] = {}
        for root in roots:
            watch = RootWatch(next(self._indexes), root, needs_polling(root))
            self._watches[watch.index] = watch
        self._observers = Observers(settings.poll_interval_seconds, self._on_inotify_overflow)
        self._handlers = {w.index: RootEventHandler(self, w) for w in self._watches.values()}
        # Held while observers are started and watches (un)scheduled: by start(), set_roots and
        # the settle thread's health check. Taken before _cond, never from an observer thread.
        self._observing = threading.Lock()

        # Guards the settle table and the rescan queue; never held while calling out.
        self._cond = threading.Condition(threading.Lock())
        self._table = SettleTable(settings.settle_seconds, MAX_PENDING)
        # Ready files taken out of the table but not yet handed to on_ready: still pending, or a
        # caller waiting for pending() == 0 could see nothing anywhere while one is in between.
        self._handing_over = 0
        self._rescans = RescanQueue()
        self._started = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_progress = clock()
        self._next_timer: float | None = None
        self._next_health_check = 0.0
        self._stats = RemoteStats()

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
            added = [RootWatch(next(self._indexes), root, needs_polling(root)) for root in fresh]
            rewatch: list[RootWatch] = []
            rescan: list[RootWatch] = list(added)
            with self._cond:
                for watch in added:
                    self._watches[watch.index] = watch
                    self._handlers[watch.index] = RootEventHandler(self, watch)
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
            observers = self._observers.detach()
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(STOP_TIMEOUT_SECONDS)  # a poll stuck on a dead network mount stays behind
        self._stats.shutdown()  # so may a stat
        log.info("watcher_stopped")

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

    def _forget_watch(self, watch: RootWatch) -> None:
        """Drop a root that set_roots removed: its queued rescans and pending files. Caller holds _cond."""
        watch.removed = True
        del self._watches[watch.index]
        del self._handlers[watch.index]
        self._rescans.drop_root(watch.index)
        self._table.drop_root(watch.root.path)

    def _take_rescans(self) -> list[tuple[RootWatch, Path, str]]:
        return [(self._watches[i], directory, reason) for i, directory, reason in self._rescans.take()]

    def _idle_timeout(self) -> float:
        now = self._clock()
        wake = now + MAX_IDLE_SECONDS
        for moment in (self._table.next_deadline(), self._next_timer, self._next_health_check):
            if moment is not None:
                wake = min(wake, moment)
        return max(0.0, wake - now)

    def _deliver_rescans(self, rescans: list[tuple[RootWatch, Path, str]]) -> None:
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
                if signature is UNANSWERED:
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
        """Each file's signature; those on polled roots that do not answer come back ``UNANSWERED``."""
        with self._cond:
            remote = {w.root.path for w in self._watches.values() if w.polling}
        return self._stats.signatures(paths, remote)

    def unresponsive_roots(self) -> list[str]:
        """Polled roots whose last file stats did not answer (a hung network mount)."""
        return sorted(str(r) for r in self._stats.unresponsive)

    def _run_timer(self) -> None:
        if self._next_timer is None or self._clock() < self._next_timer:
            return
        self._next_timer = self._clock() + self._settings.rescan_interval_seconds
        with self._cond:
            for watch in self._watches.values():
                self._queue_rescan(watch, watch.root.path, "timer")

    # -- observer health (settle thread, and start()) --------------------------------------

    def _schedule(self, watch: RootWatch, *, rescan_on_success: bool) -> None:
        if self._observers.schedule(watch, self._handlers[watch.index]) and rescan_on_success:
            with self._cond:
                self._queue_rescan(watch, watch.root.path, "observer_error")

    def _unschedule(self, watch: RootWatch) -> None:
        self._observers.unschedule(watch)

    def _check_observers(self) -> None:
        now = self._clock()
        if now < self._next_health_check:
            return
        if not self._observing.acquire(blocking=False):
            return  # set_roots is (un)scheduling watches: check again next time
        try:
            self._next_health_check = now + HEALTH_CHECK_SECONDS
            self._observers.check(
                list(self._watches.values()), lambda watch: self._schedule(watch, rescan_on_success=True)
            )
        finally:
            self._observing.release()

    def _install_overflow_handler(self) -> None:
        self._observers.install_overflow_handler(list(self._watches.values()))


def _captions_differently(old: WatchRoot, new: WatchRoot) -> bool:
    """Would a scan of the root find other work under ``new``? (Not so for a new prompt, prefix or
    suffix: those apply to the captions made from now on.)"""
    same = {"prompt", "prefix", "suffix", "on_delete"}
    return old.model_dump(exclude=same) != new.model_dump(exclude=same)
