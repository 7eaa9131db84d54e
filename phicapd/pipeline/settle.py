"""The settle table: files waiting to settle, judged on "unchanged since the last look".

Rules:

* A file is ready once its (size, mtime_ns, inode) signature stayed the same for
  ``settle_seconds`` (``check`` compares a fresh stat with the one taken at the last look). The
  mtime is compared, never judged against the clock: a file stamped in the future (``cp -p``,
  unzip, a camera with a wrong clock, NFS skew) settles like any other.
* One entry per path: adding a known file restarts its clock, never adds a second entry.
* A file reopened for writing (``refresh(writing=True)``) waits for its next close, or for
  ``stalled_write_seconds`` without change when that close never comes.
* A file that is gone is dropped. One that stays empty is ready only after
  ``stalled_write_seconds`` without change: a browser's placeholder is usually renamed over
  before that (and the image is then judged alone), while an image that really is empty is
  handed on, to be recorded as ``image_empty`` instead of waiting silently for a rescan.
* No threads, no I/O: the caller stats files outside its lock, feeds the results in and guards
  the table with that lock. The watcher (events) and intake (files a scan found still changing)
  each keep one.
"""

from __future__ import annotations

import heapq
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.pipeline.paths import is_candidate

#: Files handed out by one ``due`` call, so a flood never starves the caller's other work.
SETTLE_BATCH = 1024
#: A file reopened for writing is ready only after its next close; if that close never comes
#: (a lost event), it is ready after this long without any change.
STALLED_WRITE_SECONDS = 60.0

Signature = tuple[int, int, int]  # (size, mtime_ns, inode)


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
    max_entries: int | None = None  # None: no limit
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
            if self.max_entries is not None and len(self._entries) >= self.max_entries:
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

    def drop_root(self, root_path: Path) -> None:
        """Forget every file of the root at ``root_path`` (it is no longer watched)."""
        for path in [p for p, e in self._entries.items() if e.root.path == root_path]:
            del self._entries[path]

    def replace_root(self, root: WatchRoot) -> None:
        """The root at ``root.path`` has new settings: its files are judged and reported with
        them, and those it no longer captions are forgotten."""
        for path, entry in list(self._entries.items()):
            if entry.root.path == root.path:
                if is_candidate(path, root):
                    entry.root = root
                else:
                    del self._entries[path]

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
        if signature is None:  # gone
            del self._entries[path]
            return None
        if signature == entry.signature:
            # An empty file is waited on like one still being written: it may be the placeholder
            # a browser creates before renaming its ".part" over it.
            waits = entry.writing or signature[0] == 0
            if not waits or now - entry.last_change >= self.stalled_write_seconds:
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
