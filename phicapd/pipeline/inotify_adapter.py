"""Every use of watchdog's internals, in one place: its inotify reader, move grouper and emitter.

Rules:

* Nothing else in phicapd imports a private watchdog module (``inotify_c``,
  ``inotify_move_event_grouper``) or subclasses a watchdog class other than
  ``FileSystemEventHandler``; the rest of the watcher uses watchdog's public API.
* What is used here is checked by ``internals_problems()`` (run by the test suite, and logged by
  the watcher at start): a watchdog release that changes it fails that test with the version's
  name instead of breaking watching at run time. ``pyproject.toml`` pins the tested range,
  ``TESTED_WATCHDOG``.
* Three changes to watchdog's inotify observer, each for a reason given where it is made:
  overflows are reported after watchdog has rebuilt its watches (``OverflowReportingInotifyFD``),
  moves are paired by cookie in O(1) (``CookieIndexedMoveGrouper``), and full events are on
  (``ReportingInotifyObserver``).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog
import watchdog.version
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)

log = structlog.get_logger(__name__)

#: The watchdog releases this module was tested with (the pin in pyproject.toml).
TESTED_WATCHDOG = ">=7.1,<7.2"

#: The logger on which watchdog 7.1's ``InotifyFD.handle_event`` reports ``IN_Q_OVERFLOW``
#: ("Inotify queue overflowed; filesystem events were lost"). Our own readers report overflows
#: directly; the log record catches any other inotify reader's.
INOTIFY_LOGGER = "watchdog.observers.inotify_c"


class OverflowLogHandler(logging.Handler):
    """Turns watchdog's inotify overflow warning into a rescan request."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        # Our own inotify readers report their overflows after handling them (see below).
        if isinstance(threading.current_thread(), OverflowReportingInotifyFD):
            return
        try:
            if "overflow" in record.getMessage().lower():
                self._on_overflow()
        except Exception:
            self.handleError(record)


class OverflowReportingInotifyFD(InotifyFD):
    """watchdog's inotify reader, reporting a queue overflow once watchdog has handled it.

    watchdog logs the overflow *before* it rebuilds its watches, and it silently drops events
    that still carry the old watch descriptors; a scan requested at the log record could run
    before those files exist. Requested from here, after the rebuild, the scan misses nothing.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)
        if event.is_queue_overflow:
            try:
                self._on_overflow()
            except Exception:
                log.exception("overflow_report_failed")


@dataclass(slots=True)
class _Queued:
    event: GroupedInotifyEvent
    at: float
    hold: bool  # an unpaired IN_MOVED_FROM (so ``event`` is one event): held back for its IN_MOVED_TO
    live: bool = True  # False once paired: its pair was queued in its place

    @property
    def moved_from(self) -> PathedInotifyEvent:
        return cast(PathedInotifyEvent, self.event)


class CookieIndexedMoveGrouper(InotifyMoveEventGrouper):
    """watchdog's move pairing, with pending IN_MOVED_FROM events indexed by cookie.

    watchdog's grouper finds the IN_MOVED_FROM of each IN_MOVED_TO by scanning its whole queue
    of undelivered events, twice. Under a flood of renames (downloads renamed from ``.part``, our
    own sidecar renames) the queue grows and that scan made the inotify reader O(n²): it held
    the GIL for most of the run and let the kernel queue overflow. Same behaviour here (events in
    order, an unpaired IN_MOVED_FROM held ``delay`` seconds for its partner, the pair delivered at
    the position of its IN_MOVED_TO), in O(1) per event. Pairing itself stays: watchdog needs it
    to move its watches when a watched directory is renamed.
    """

    def __init__(self) -> None:  # no super().__init__(): its DelayedQueue is what this replaces
        self._cond = threading.Condition(threading.Lock())
        self._events: deque[_Queued] = deque()
        self._moved_from: dict[int, _Queued] = {}  # by cookie, while still queued
        self._closed = False

    def put_event(self, event: PathedInotifyEvent) -> None:
        now = time.monotonic()
        with self._cond:
            source = self._moved_from.pop(event.ev.cookie, None) if event.ev.is_moved_to else None
            if source is not None:
                source.live = False
                item = _Queued((source.moved_from, event), now, hold=False)
            else:
                item = _Queued(event, now, hold=event.ev.is_moved_from)
                if item.hold:
                    self._moved_from[event.ev.cookie] = item
            self._events.append(item)
            self._cond.notify()

    def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
        with self._cond:
            item = self._moved_from.get(cookie)
            return item.moved_from if item is not None else None

    def read_event(self) -> GroupedInotifyEvent | None:
        """The next event, blocking; None once closed."""
        with self._cond:
            while not self._closed:
                if not self._events:
                    self._cond.wait()
                    continue
                head = self._events[0]
                if not head.live:
                    self._events.popleft()
                    continue
                wait = head.at + self.delay - time.monotonic() if head.hold else 0.0
                if wait > 0:
                    self._cond.wait(wait)  # woken early when its IN_MOVED_TO pairs it
                    continue
                self._events.popleft()
                if head.hold:
                    self._moved_from.pop(head.moved_from.ev.cookie, None)
                return head.event
            return None

    # The three queries below serve watchdog's directory bookkeeping (a directory moved out,
    # deleted and recreated): rare, so a walk of the queue is fine.

    def has_pending_moved_from(self, path: bytes) -> bool:
        """Whether an unpaired IN_MOVED_FROM of the directory ``path`` waits for its partner."""
        path = os.path.normpath(path)
        with self._cond:
            return any(
                q.moved_from.ev.is_directory and os.path.normpath(q.moved_from.path) == path
                for q in self._moved_from.values()
            )

    def has_pending_move_to_or_create(self, path: bytes) -> bool:
        """Whether an undelivered IN_MOVED_TO or IN_CREATE of the directory ``path`` is queued."""
        path = os.path.normpath(path)
        with self._cond:
            for q in self._events:
                if not q.live:
                    continue
                to = q.event if isinstance(q.event, PathedInotifyEvent) else q.event[1]
                single = isinstance(q.event, PathedInotifyEvent)
                if (
                    to.ev.is_directory
                    and (not single or to.ev.is_moved_to or to.ev.is_create)
                    and os.path.normpath(to.path) == path
                ):
                    return True
            return False

    def purge_events_for_wds(self, wds: set[int]) -> None:
        """Drop the undelivered events of these (removed) watches; a paired move goes with the
        watch of its destination."""
        if not wds:
            return
        with self._cond:
            kept: deque[_Queued] = deque()
            for q in self._events:
                event = q.event if isinstance(q.event, PathedInotifyEvent) else q.event[1]
                if q.live and event.ev.wd in wds:
                    if q.hold:
                        self._moved_from.pop(q.moved_from.ev.cookie, None)
                    continue
                kept.append(q)
            self._events = kept
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _WatchGroup(InotifyWatchGroup):
    """watchdog's watch group on the cookie-indexed move grouper."""

    def __post_init__(self) -> None:
        self._move_event_grouper = CookieIndexedMoveGrouper()
        super().__post_init__()


class _InotifyEmitter(InotifyFullEmitter):
    """``InotifyFullEmitter`` whose watch group pairs moves in O(1) (see above)."""

    def on_thread_start(self) -> None:
        # InotifyEmitter.on_thread_start with our watch group.
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


class ReportingInotifyObserver(InotifyObserver):
    """``InotifyObserver(generate_full_events=True)`` on an overflow-reporting inotify reader.

    Full events: a file moved in from outside the watched tree arrives as a move with an empty
    source rather than a bare "created", which a close-driven watcher could not tell from a file
    still being written.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        # InotifyObserver.__init__ hard-wires its reader; this is the same set-up with ours.
        self._inotify_fd = OverflowReportingInotifyFD(on_overflow)
        self._inotify_fd.start()
        BaseObserver.__init__(self, _InotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd)

    def reader_alive(self) -> bool:
        """Whether the thread that reads the inotify fd for every watch still runs: when an
        exception ends it, watchdog closes the fd and no watch of this observer sees events."""
        return self._inotify_fd.is_alive()


def observer_alive(observer: BaseObserver) -> bool:
    """The observer's thread runs and, for inotify, so does its reader."""
    if isinstance(observer, ReportingInotifyObserver) and not observer.reader_alive():
        return False
    return observer.is_alive()


def make_inotify_observer(on_overflow: Callable[[], None]) -> BaseObserver:
    """An inotify observer (full events, O(1) move pairing) that calls ``on_overflow`` after
    each kernel queue overflow, once watchdog has rebuilt its watches."""
    return ReportingInotifyObserver(on_overflow)


# ---------------------------------------------------------------------------------------------
# The check of what this module relies on


def internals_problems() -> list[str]:
    """What this module relies on in watchdog and is missing or changed in the installed
    release; empty when all is as tested."""
    problems: list[str] = []

    def need(owner: type, name: str, params: list[str] | None = None, *, keywords: set[str] | None = None) -> None:
        """``owner.name`` exists; its parameters start with ``params``; it takes ``keywords``."""
        label = f"{owner.__module__}.{owner.__qualname__}.{name}"
        value = getattr(owner, name, None)
        if value is None:
            problems.append(f"{label} is missing")
            return
        if params is None and keywords is None:
            return
        try:
            found = list(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            problems.append(f"{label} has no signature")
            return
        if params is not None and found[: len(params)] != params:
            problems.append(f"{label}{tuple(found)} does not start with {tuple(params)}")
        if keywords is not None and not keywords <= set(found):
            problems.append(f"{label}{tuple(found)} lacks {sorted(keywords - set(found))}")

    # The reader: built with no arguments, started as a thread, events handed to handle_event.
    need(InotifyFD, "__init__", ["self"])
    need(InotifyFD, "handle_event", ["self", "event"])
    need(InotifyFD, "read_events")
    need(InotifyFD, "start")
    for flag in ("is_queue_overflow", "is_moved_from", "is_moved_to", "is_directory", "is_create"):
        need(InotifyEvent, flag)
    need(InotifyEvent, "__init__", ["self", "wd", "mask", "cookie", "name"])
    if getattr(PathedInotifyEvent, "_fields", None) != ("ev", "path"):
        problems.append("PathedInotifyEvent is no longer the named tuple (ev, path)")
    # The grouper: ours replaces every method, so each one watchdog has must be ours too.
    for name, member in vars(InotifyMoveEventGrouper).items():
        if callable(member) and not name.startswith("_") and name not in vars(CookieIndexedMoveGrouper):
            problems.append(f"InotifyMoveEventGrouper.{name} is not implemented by CookieIndexedMoveGrouper")
    need(InotifyMoveEventGrouper, "delay")
    # The watch group builds its grouper in a dataclass field and uses it from __post_init__.
    fields = getattr(InotifyWatchGroup, "__dataclass_fields__", {})
    if "_move_event_grouper" not in fields:
        problems.append("InotifyWatchGroup has no _move_event_grouper field")
    need(InotifyWatchGroup, "__post_init__", ["self"])
    need(InotifyWatchGroup, "__init__", keywords={"path", "is_recursive", "event_mask", "follow_symlink"})
    # The emitter builds its watch group in on_thread_start from these.
    need(InotifyFullEmitter, "on_thread_start", ["self"])
    need(InotifyFullEmitter, "get_event_mask_from_filter", ["self"])
    need(
        InotifyFullEmitter,
        "__init__",
        ["self", "event_queue", "watch"],
        keywords={"timeout", "event_filter", "inotify_fd"},
    )
    source = _source(InotifyFullEmitter.__init__)
    for attribute in ("self._inotify_fd", "self._inotify"):
        if attribute not in source:
            problems.append(f"InotifyEmitter.__init__ no longer sets {attribute}")
    # The observer: ours sets the reader InotifyObserver would otherwise make on first schedule.
    need(BaseObserver, "__init__", ["self", "emitter_class", "timeout"])
    for method in ("schedule", "on_thread_stop"):
        if "self._inotify_fd" not in _source(getattr(InotifyObserver, method, None)):
            problems.append(f"InotifyObserver.{method} no longer uses self._inotify_fd")
    if not isinstance(DEFAULT_OBSERVER_TIMEOUT, int | float):
        problems.append("watchdog.observers.api.DEFAULT_OBSERVER_TIMEOUT is not a number")
    if "overflow" not in _source(getattr(InotifyFD, "handle_event", None)).lower():
        problems.append(f"InotifyFD.handle_event no longer logs overflows on {INOTIFY_LOGGER!r}")
    return problems


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def watchdog_version() -> str:
    return str(watchdog.version.VERSION_STRING)
