"""The watcher's queue of directories to rescan: deduplicated, collapsed, bounded.

A rescan is not queued when it or one of its ancestors already is; a whole-root rescan replaces
the root's queued subdirectories; past ``MAX_QUEUED_RESCANS`` (a flood of new directories) a
request becomes an ``"overflow"`` rescan of its root. The caller holds its own lock around every
method.
"""

from __future__ import annotations

from pathlib import Path

#: Most directories waiting to be rescanned; beyond it a root's requests collapse into one.
MAX_QUEUED_RESCANS = 10_000


class RescanQueue:
    """Rescans by (root index, directory), in the order they were asked for."""

    def __init__(self) -> None:
        self._queued: dict[tuple[int, Path], str] = {}  # insertion-ordered, deduplicated
        self.overflowed: set[int] = set()  # roots with an overflow rescan owed

    def __contains__(self, key: tuple[int, Path]) -> bool:
        return key in self._queued

    def __bool__(self) -> bool:
        return bool(self._queued)

    def add(self, index: int, root: Path, directory: Path, reason: str) -> bool:
        """Queue a rescan of ``directory`` under the root ``root``; False when one covering it is queued."""
        for queued in (directory, *directory.parents):
            if (index, queued) in self._queued:
                return False
            if queued == root:
                break
        if len(self._queued) >= MAX_QUEUED_RESCANS:  # a flood of new directories
            directory, reason = root, "overflow"
        if directory == root:  # a whole-root scan covers its queued subdirectories
            self.forget(index)
        self._queued[(index, directory)] = reason
        return True

    def forget(self, index: int) -> None:
        """Drop a root's queued rescans."""
        for key in [k for k in self._queued if k[0] == index]:
            del self._queued[key]

    def drop_root(self, index: int) -> None:
        """A root no longer watched: nothing of it stays queued or owed."""
        self.forget(index)
        self.overflowed.discard(index)

    def take(self) -> list[tuple[int, Path, str]]:
        """Everything queued, oldest first; the queue is empty after."""
        out = [(i, directory, reason) for (i, directory), reason in self._queued.items()]
        self._queued.clear()
        for index, _, reason in out:
            if reason == "overflow":
                self.overflowed.discard(index)
        return out
