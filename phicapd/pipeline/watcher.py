"""Turn filesystem events under the watched roots into two callbacks.

* ``on_ready(path, root)``: an image was closed after writing or moved in, and its
  (size, mtime_ns, inode) then stayed unchanged for ``settle_seconds``.
* ``on_rescan(root, directory, reason)``: events may have been missed, so the caller should
  reconcile ``directory`` against the journal. Reasons: ``"new_dir"`` (a directory appeared; files
  that landed in it before its watch existed raised no event), ``"overflow"`` (the kernel's inotify
  queue or our settle table overflowed), ``"timer"`` (the periodic safety net) and
  ``"observer_error"`` (an observer or a root's watch died and was re-established).

Events are hints; the scan is the truth. Every callback runs on the watcher's own settle thread,
never on a watchdog thread and never under a lock that a watchdog thread needs: watchdog's observer
dispatches events while holding its own lock, so the event handlers here only update the settle
table under a short lock and wake the settle thread.

inotify (watchdog's ``InotifyObserver``) is the default. Roots with ``poll = true``, or with
``poll`` unset on a network filesystem (where inotify cannot see changes made by other clients),
use watchdog's ``PollingObserver``, which has no close events: there a created or modified file
is a candidate and the settle time alone decides.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

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
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)
from watchdog.observers.polling import PollingObserver

from phicapd.config import WatcherSettings, WatchRoot
from phicapd.pipeline.paths import is_candidate, is_watched_dir

log = structlog.get_logger(__name__)

#: Most files waiting to settle; beyond it new candidates are dropped and their root is rescanned.
MAX_PENDING = 100_000
#: How often the settle thread checks that observers and their watches are alive.
HEALTH_CHECK_SECONDS = 1.0
#: Longest sleep of the settle thread, so that ``last_progress`` stays fresh when idle.
MAX_IDLE_SECONDS = 1.0
#: Most directories waiting to be rescanned; beyond it a root's requests collapse into one.
MAX_QUEUED_RESCANS = 10_000
#: Files settled per loop iteration, so a flood never starves rescans or ``last_progress``.
SETTLE_BATCH = 1024
#: How long stop() waits for each thread (they are daemon threads: none blocks the exit).
STOP_TIMEOUT_SECONDS = 10.0
#: How long the settle thread waits for the stats of files on polled (network) roots: a hung
#: NFS or SMB mount must not stop every other root from settling (nor the watchdog's pings).
REMOTE_STAT_SECONDS = 5.0
REMOTE_STAT_THREADS = 4
#: A file reopened for writing is ready only after its next close; if that close never comes
#: (a lost event), it is ready after this long without any change.
STALLED_WRITE_SECONDS = 60.0

#: The logger on which watchdog 7.1's ``InotifyFD.handle_event`` reports ``IN_Q_OVERFLOW``
#: ("Inotify queue overflowed; filesystem events were lost"). It emits no event for it. Our own
#: readers report overflows directly; the log record catches any other inotify reader's.
INOTIFY_LOGGER = "watchdog.observers.inotify_c"

RESCAN_REASONS = ("new_dir", "overflow", "timer", "observer_error")

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

# Filesystems whose changes made elsewhere (another client, the host of a VM) never reach local
# inotify. FUSE mounts appear as "fuse.<helper>".
REMOTE_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "afs",
        "ocfs2",
        "gfs2",
        "beegfs",
        "virtiofs",
        "vboxsf",
        "davfs",
        "fuse.sshfs",
        "sshfs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.ceph-fuse",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
        "fuse.davfs2",
        "fuse.vmhgfs-fuse",
        "fuse.juicefs",
        "fuse.moosefs",
        "fuse.mfs",
        "fuse.beegfs",
    }
)

Signature = tuple[int, int, int]  # (size, mtime_ns, inode)


# ---------------------------------------------------------------------------------------------
# Network filesystem detection


def _unescape_mount_field(value: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``(mount point, fstype)`` for each line of ``/proc/self/mountinfo``, in file order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mounts.append((_unescape_mount_field(fields[4]), tail[0]))
    return mounts


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The fstype of the mount holding ``path`` (symlinks resolved), or None if unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for mount_point, fstype in parse_mountinfo(mountinfo):
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # ">=": a later mount on the same point hides the earlier one.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fstype)
    return best[1] if best else None


def is_remote_filesystem(fstype: str | None) -> bool:
    return fstype is not None and fstype.lower() in REMOTE_FILESYSTEMS


def needs_polling(root: WatchRoot, mountinfo: str | None = None) -> bool:
    """``root.poll`` when set; otherwise poll exactly where inotify cannot see remote changes."""
    if root.poll is not None:
        return root.poll
    return is_remote_filesystem(filesystem_type(root.path, mountinfo))


# ---------------------------------------------------------------------------------------------
# The settle table (no threads, no I/O: the Watcher feeds it stat results and guards it)


_UNANSWERED = object()  # a stat that did not return in time


def file_signature(path: Path | str) -> Signature | None:
    """(size, mtime_ns, inode) of a regular file, None when it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class _Pending:
    root: WatchRoot
    signature: Signature
    deadline: float
    last_change: float
    writing: bool = False  # reopened for writing (inotify): wait for its close
    generation: int = 0  # bumped by every event, so a check that raced with one is discarded
    scheduled: bool = True  # has exactly one item in the heap


@dataclass
class SettleTable:
    """Files waiting to settle, by path, with a heap of deadlines (one heap item per file)."""

    settle_seconds: float
    max_entries: int = MAX_PENDING
    stalled_write_seconds: float = STALLED_WRITE_SECONDS
    _entries: dict[Path, _Pending] = field(default_factory=dict)
    _heap: list[tuple[float, Path]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: Path) -> bool:
        return path in self._entries

    def add(self, path: Path, root: WatchRoot, signature: Signature, now: float) -> bool:
        """A candidate event (closed, moved in, polled change): start or restart its settle clock.

        Returns False, adding nothing, when the table is full.
        """
        entry = self._entries.get(path)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                return False
            self._entries[path] = _Pending(root, signature, now + self.settle_seconds, now)
            heapq.heappush(self._heap, (now + self.settle_seconds, path))
            return True
        self._restart(path, entry, signature, now, writing=False)
        return True

    def refresh(self, path: Path, signature: Signature, now: float, *, writing: bool) -> None:
        """A change to a file that may be known: restart its clock; ``writing`` = opened for writing."""
        entry = self._entries.get(path)
        if entry is not None:
            self._restart(path, entry, signature, now, writing=writing or entry.writing)

    def discard(self, path: Path) -> None:
        self._entries.pop(path, None)  # its heap item is skipped when it comes up

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, path = self._heap[0]
            entry = self._entries.get(path)
            if entry is not None and entry.scheduled:
                return min(deadline, entry.deadline)
            heapq.heappop(self._heap)  # stale: the file was discarded or is being checked
        return None

    def due(self, now: float, limit: int = SETTLE_BATCH) -> list[tuple[Path, int]]:
        """Files whose deadline has passed, as ``(path, generation)`` to stat and pass to ``check``."""
        out: list[tuple[Path, int]] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            _, path = heapq.heappop(self._heap)
            entry = self._entries.get(path)
            if entry is None or not entry.scheduled:
                continue
            if entry.deadline > now:  # restarted since it was pushed: move it back
                heapq.heappush(self._heap, (entry.deadline, path))
                continue
            entry.scheduled = False
            out.append((path, entry.generation))
        return out

    def later(self, path: Path, generation: int, now: float) -> None:
        """A due file whose stat did not answer (a hung network mount): judge it again later."""
        entry = self._entries.get(path)
        if entry is None or entry.generation != generation:
            return
        entry.deadline = now + self.settle_seconds
        self._schedule(path, entry)

    def check(self, path: Path, generation: int, signature: Signature | None, now: float) -> WatchRoot | None:
        """Judge a due file from a fresh stat; returns its root when it is ready (and forgets it)."""
        entry = self._entries.get(path)
        if entry is None or entry.generation != generation:
            return None  # discarded, or an event restarted it while we were stating
        if signature is None or (signature == entry.signature and signature[0] == 0):
            # Gone, or settled empty (e.g. the placeholder a browser creates before renaming its
            # ".part" over it): no image. Content arriving later raises a new event.
            del self._entries[path]
            return None
        if signature == entry.signature:
            if not entry.writing or now - entry.last_change >= self.stalled_write_seconds:
                del self._entries[path]
                return entry.root
        else:
            entry.signature = signature
            entry.last_change = now
        entry.deadline = now + self.settle_seconds
        self._schedule(path, entry)
        return None

    def _restart(self, path: Path, entry: _Pending, signature: Signature, now: float, *, writing: bool) -> None:
        entry.signature = signature
        entry.deadline = now + self.settle_seconds
        entry.last_change = now
        entry.writing = writing
        entry.generation += 1
        if not entry.scheduled:
            self._schedule(path, entry)

    def _schedule(self, path: Path, entry: _Pending) -> None:
        entry.scheduled = True
        heapq.heappush(self._heap, (entry.deadline, path))


# ---------------------------------------------------------------------------------------------
# Observers


@dataclass
class _RootWatch:
    index: int
    root: WatchRoot
    polling: bool
    observed: ObservedWatch | None = None  # None while its directory cannot be watched
    failing: bool = False  # the last attempt to watch it failed (logged once per outage)


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


class _OverflowLogHandler(logging.Handler):
    """Turns watchdog's inotify overflow warning into a rescan request."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        # Our own inotify readers report their overflows after handling them (see below).
        if isinstance(threading.current_thread(), _OverflowReportingInotifyFD):
            return
        try:
            if "overflow" in record.getMessage().lower():
                self._on_overflow()
        except Exception:
            self.handleError(record)


class _OverflowReportingInotifyFD(InotifyFD):
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


class _CookieIndexedMoveGrouper(InotifyMoveEventGrouper):
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

    def discard_pending_events(self) -> None:
        with self._cond:
            self._events.clear()
            self._moved_from.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _WatchGroup(InotifyWatchGroup):
    """watchdog's watch group on the cookie-indexed move grouper."""

    def __post_init__(self) -> None:
        self._move_event_grouper = _CookieIndexedMoveGrouper()
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


class _InotifyObserver(InotifyObserver):
    """``InotifyObserver(generate_full_events=True)`` on an overflow-reporting inotify reader.

    Full events: a file moved in from outside the watched tree arrives as a move with an empty
    source rather than a bare "created", which a close-driven watcher could not tell from a file
    still being written.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        # InotifyObserver.__init__ hard-wires its reader; this is the same set-up with ours.
        self._inotify_fd = _OverflowReportingInotifyFD(on_overflow)
        self._inotify_fd.start()
        BaseObserver.__init__(self, _InotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd)


class Watcher:
    """Watches the roots and calls ``on_ready`` / ``on_rescan`` from its settle thread."""

    def __init__(
        self,
        roots: list[WatchRoot],
        settings: WatcherSettings,
        *,
        on_ready: Callable[[Path, WatchRoot], None],
        on_rescan: Callable[[WatchRoot, Path, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._on_ready = on_ready
        self._on_rescan = on_rescan
        self._clock = clock
        self._watches = [_RootWatch(i, root, needs_polling(root)) for i, root in enumerate(roots)]
        self._observers: dict[bool, BaseObserver] = {}  # by "polling"
        self._handlers = {w.index: _RootEventHandler(self, w) for w in self._watches}
        self._overflow_handler = _OverflowLogHandler(self._on_inotify_overflow)

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
        with self._cond:
            if self._started or self._stopping:
                raise RuntimeError("a Watcher starts once and cannot restart after stop()")
            self._started = True
        self._install_overflow_handler()
        for watch in self._watches:
            self._schedule(watch, rescan_on_success=False)
        now = self._clock()
        interval = self._settings.rescan_interval_seconds
        self._next_timer = now + interval if interval > 0 else None
        self._next_health_check = now + HEALTH_CHECK_SECONDS
        self._thread = threading.Thread(target=self._run, name="phicapd-watcher", daemon=True)
        self._thread.start()
        log.info(
            "watcher_started",
            roots=[str(w.root.path) for w in self._watches],
            polling=[str(w.root.path) for w in self._watches if w.polling],
        )

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        logging.getLogger(INOTIFY_LOGGER).removeHandler(self._overflow_handler)
        # The settle thread goes first: it may be (re)starting observers. It stops between two
        # callbacks; a callback stuck for longer is reported, not waited for forever.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                log.error("watcher_thread_stuck_in_callback", waited_s=STOP_TIMEOUT_SECONDS)
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
            # A directory moved out (full events: empty destination) needs nothing: its pending
            # files are dropped when their stat fails.
            new_dir = event.src_path if event.event_type == EVENT_TYPE_CREATED else event.dest_path
            if event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED) and new_dir:
                self._on_new_dir(watch, Path(os.fsdecode(new_dir)))
            return
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        if isinstance(event, FileMovedEvent):
            if src is not None:
                self._forget(src)
            if event.dest_path:
                self._on_candidate(watch, Path(os.fsdecode(event.dest_path)))
        elif src is None:
            return
        elif isinstance(event, FileDeletedEvent):
            self._forget(src)
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

    def _forget(self, path: Path) -> None:
        with self._cond:
            self._table.discard(path)

    def _on_inotify_overflow(self) -> None:
        # One inotify instance serves every inotify root and the kernel does not say which
        # watches lost events, so all of them are rescanned.
        with self._cond:
            if self._stopping:
                return
            for watch in self._watches:
                if not watch.polling:
                    self._queue_rescan(watch, watch.root.path, "overflow")

    def _queue_rescan(self, watch: _RootWatch, directory: Path, reason: str) -> None:
        """Queue a rescan unless it or one of its ancestors is already queued. Caller holds _cond."""
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
        remote = {w.root.path for w in self._watches if w.polling}
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
            for watch in self._watches:
                self._queue_rescan(watch, watch.root.path, "timer")

    # -- observer health (settle thread, and start()) --------------------------------------

    def _observer_for(self, polling: bool) -> BaseObserver:
        observer = self._observers.get(polling)
        if observer is None:
            if polling:
                observer = PollingObserver(timeout=self._settings.poll_interval_seconds)
            else:
                observer = _InotifyObserver(self._on_inotify_overflow)
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

    def _check_observers(self) -> None:
        now = self._clock()
        if now < self._next_health_check:
            return
        self._next_health_check = now + HEALTH_CHECK_SECONDS
        for polling, observer in list(self._observers.items()):
            if not observer.is_alive():
                log.error("observer_died_restarting", polling=polling)
                with contextlib.suppress(Exception):
                    observer.stop()  # stops its emitters, if any still run
                del self._observers[polling]
                for watch in self._watches:
                    if watch.polling == polling:
                        watch.observed = None
        for watch in self._watches:
            if watch.observed is not None and not self._emitter_alive(watch):
                # The root was deleted or its emitter crashed; watchdog stops watching it.
                log.warning("watch_lost", root=str(watch.root.path))
                with contextlib.suppress(KeyError):
                    self._observers[watch.polling].unschedule(watch.observed)
                watch.observed = None
            if watch.observed is None:
                self._schedule(watch, rescan_on_success=True)

    def _emitter_alive(self, watch: _RootWatch) -> bool:
        observer = self._observers.get(watch.polling)
        if observer is None:
            return False
        return any(e.watch == watch.observed and e.is_alive() for e in list(observer.emitters))

    def _install_overflow_handler(self) -> None:
        if not all(w.polling for w in self._watches):
            logging.getLogger(INOTIFY_LOGGER).addHandler(self._overflow_handler)
