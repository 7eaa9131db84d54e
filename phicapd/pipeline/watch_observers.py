"""The watcher's observers: one inotify observer and one polling observer, each started on
first use, and the watch of every root on one of them.

Observers and watches are (re)started only by ``Watcher.start()``, ``Watcher.set_roots`` and the
settle thread's health check (``Observers.check``), one at a time: the watcher holds its
``_observing`` lock around every method here. Events reach the watcher through
``RootEventHandler``, on the observer's thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from watchdog.events import (
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

from phicapd.config import WatchRoot
from phicapd.pipeline.inotify_adapter import (
    INOTIFY_LOGGER,
    OverflowLogHandler,
    make_inotify_observer,
    observer_alive,
)

log = structlog.get_logger(__name__)

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


@dataclass
class RootWatch:
    index: int
    root: WatchRoot
    polling: bool
    observed: ObservedWatch | None = None  # None while its directory cannot be watched
    failing: bool = False  # the last attempt to watch it failed (logged once per outage)
    removed: bool = False  # set_roots dropped it: its late events are ignored


class EventSink(Protocol):
    def _on_event(self, watch: RootWatch, event: FileSystemEvent) -> None: ...


class RootEventHandler(FileSystemEventHandler):
    """Hands every event of one root to the watcher; runs on the observer's thread."""

    def __init__(self, watcher: EventSink, watch: RootWatch) -> None:
        self._watcher = watcher
        self._watch = watch

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(self._watch, event)
        except Exception:
            # An exception here would kill the observer thread, and with it every root.
            log.exception("watch_event_failed", event=repr(event))


class Observers:
    """The running observers (by "polling") and the scheduling of roots' watches on them."""

    def __init__(self, poll_interval: float, on_overflow: Callable[[], None]) -> None:
        self._poll_interval = poll_interval
        self._on_overflow = on_overflow
        self.running: dict[bool, BaseObserver] = {}  # by "polling"
        self.overflow_handler = OverflowLogHandler(on_overflow)

    def _observer_for(self, polling: bool) -> BaseObserver:
        observer = self.running.get(polling)
        if observer is None:
            if polling:
                observer = PollingObserver(timeout=self._poll_interval)
            else:
                observer = make_inotify_observer(self._on_overflow)
            observer.start()
            self.running[polling] = observer
        return observer

    def schedule(self, watch: RootWatch, handler: FileSystemEventHandler) -> bool:
        """Watch the root; False when its directory cannot be watched now (logged once)."""
        try:
            observer = self._observer_for(watch.polling)
            watch.observed = observer.schedule(
                handler,
                str(watch.root.path),
                recursive=watch.root.recursive,
                event_filter=HANDLED_EVENTS,
            )
        except OSError as e:
            if not watch.polling and e.errno in (errno.ENOSPC, errno.EMFILE):
                # Out of inotify watches or instances: polling still works, just slower.
                log.warning("inotify_limit_reached_polling_instead", root=str(watch.root.path), error=str(e))
                watch.polling = True
                return self.schedule(watch, handler)
            if not watch.failing:
                log.error("watch_root_unavailable", root=str(watch.root.path), error=str(e))
            watch.failing = True
            return False
        if watch.failing:
            log.info("watch_root_restored", root=str(watch.root.path))
        watch.failing = False
        return True

    def unschedule(self, watch: RootWatch) -> None:
        observer = self.running.get(watch.polling)
        if watch.observed is not None and observer is not None:
            with contextlib.suppress(KeyError):
                observer.unschedule(watch.observed)
        watch.observed = None

    def check(self, watches: list[RootWatch], reschedule: Callable[[RootWatch], None]) -> None:
        """Restart dead observers; ``reschedule`` each watch that is not (or no longer) in place."""
        for polling, observer in list(self.running.items()):
            if not observer_alive(observer):
                log.error("observer_died_restarting", polling=polling)
                with contextlib.suppress(Exception):
                    observer.stop()  # stops its emitters, if any still run
                del self.running[polling]
                for watch in watches:
                    if watch.polling == polling:
                        watch.observed = None
        for watch in watches:
            if watch.observed is not None and not self._emitter_alive(watch):
                # The root was deleted or its emitter crashed; watchdog stops watching it.
                log.warning("watch_lost", root=str(watch.root.path))
                self.unschedule(watch)
            if watch.observed is None:
                reschedule(watch)

    def _emitter_alive(self, watch: RootWatch) -> bool:
        observer = self.running.get(watch.polling)
        if observer is None:
            return False
        return any(e.watch == watch.observed and e.is_alive() for e in list(observer.emitters))

    def install_overflow_handler(self, watches: list[RootWatch]) -> None:
        # addHandler adds a handler once, however often it is called (set_roots calls it again).
        if not all(w.polling for w in watches):
            logging.getLogger(INOTIFY_LOGGER).addHandler(self.overflow_handler)

    def detach(self) -> list[BaseObserver]:
        """Stop listening for overflows; the observers, for the caller to stop (outside its lock)."""
        logging.getLogger(INOTIFY_LOGGER).removeHandler(self.overflow_handler)
        return list(self.running.values())
