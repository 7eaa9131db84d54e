"""File stats for the settle thread that a hung network mount cannot stop.

Files on polled roots (network filesystems, ``mounts.py``) are stated in a small pool, and those
that do not answer within ``REMOTE_STAT_SECONDS`` come back ``UNANSWERED``: a hung NFS or SMB
mount must not stop every other root from settling (nor the watchdog's pings). A root whose
stats did not answer is reported (``unresponsive``) until one answers again.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import structlog

from phicapd.pipeline.settle import file_signature

log = structlog.get_logger(__name__)

#: How long the settle thread waits for the stats of files on polled (network) roots.
REMOTE_STAT_SECONDS = 5.0
REMOTE_STAT_THREADS = 4

UNANSWERED = object()  # a stat that did not return in time


class RemoteStats:
    """Stats files, those under a polled root in a pool with a deadline."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None  # made on first use
        self.unresponsive: set[Path] = set()  # polled roots whose last stats did not answer

    def signatures(self, paths: list[Path], remote: set[Path]) -> list[object]:
        """Each file's signature (``Signature | None``, or ``UNANSWERED``); ``remote``: the
        polled roots."""
        owners = [_polled_root(path, remote) for path in paths] if remote else []
        if not any(owners):  # no polled root has a file here: plain stats, no pool
            return [file_signature(path) for path in paths]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(REMOTE_STAT_THREADS, thread_name_prefix="phicapd-remote-stat")
        pool = self._pool
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
                out.append(UNANSWERED)
                hung.add(owner)  # type: ignore[arg-type]
        answered = {o for o in owners if o is not None} - hung
        for root in hung - self.unresponsive:
            log.error("watch_root_unresponsive", root=str(root), waited_s=REMOTE_STAT_SECONDS)
        for root in answered & self.unresponsive:
            log.info("watch_root_responsive_again", root=str(root))
        self.unresponsive = (self.unresponsive | hung) - answered
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # a stat may stay stuck behind


def _polled_root(path: Path, remote: set[Path]) -> Path | None:
    for parent in path.parents:
        if parent in remote:
            return parent
    return None
