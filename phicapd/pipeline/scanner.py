"""Reconcile scans and intake: deciding which images need a caption and recording them.

Events are hints, the scan is the truth. ``Reconciler.scan`` walks a root (or one subtree of
it) and queues every image without an up-to-date sidecar; it runs at start-up (catch-up),
after an inotify overflow, for new subdirectories and on a timer. ``Reconciler.accept`` does
the same check for files the watcher reports settled. Both list each directory once and
commit to the journal in large groups, so a 100,000-file tree costs a few seconds, not a
transaction per file.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from phicapd.config import Settings, WatchRoot
from phicapd.log import get_logger
from phicapd.pipeline.jobs import Fingerprint, JobStore, NewWork
from phicapd.pipeline.paths import is_candidate, is_watched_dir, list_images
from phicapd.pipeline.sidecar import is_up_to_date, remove_stale_temps, sidecar_for

log = get_logger(__name__)

_CHUNK = 2000


def fingerprint(st: os.stat_result) -> Fingerprint:
    return Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class ScanReport:
    root: Path
    directory: Path
    reason: str
    images: int
    queued: int
    temps_removed: int
    seconds: float


class Reconciler:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.extension = settings.sidecar.extension

    # -- the one decision ----------------------------------------------------------------------

    def _needing(self, root: WatchRoot, directory: Path, names: Iterable[str], siblings: list[str]) -> list[NewWork]:
        """Of the image ``names`` in ``directory``, those whose sidecar is missing or stale."""
        policy = self.settings.existing_policy(root)
        candidates: list[tuple[Path, os.stat_result, Path]] = []
        for name in names:
            path = directory / name
            try:
                st = path.stat()
            except OSError:
                continue
            if not _is_regular(st):
                continue
            candidates.append((path, st, sidecar_for(path, siblings, self.extension)))
        if policy == "skip":
            return [
                NewWork(path, root.path, fingerprint(st))
                for path, st, sidecar in candidates
                if not is_up_to_date(st, sidecar)
            ]
        # overwrite: whatever we did not caption ourselves, at this version, gets a fresh caption
        done = self.store.done_fingerprints([c[0] for c in candidates])
        out = []
        for path, st, sidecar in candidates:
            fp = fingerprint(st)
            record = done.get(path)
            if record and record[0] == fp and record[1] == str(sidecar) and sidecar.exists():
                continue
            out.append(NewWork(path, root.path, fp))
        return out

    # -- watcher intake ------------------------------------------------------------------------

    def accept(self, settled: Iterable[tuple[Path, WatchRoot]]) -> int:
        """Queue the settled files that need a caption; returns how many became pending."""
        by_dir: dict[tuple[Path, Path], tuple[WatchRoot, list[str]]] = {}
        for path, root in settled:
            key = (path.parent, root.path)
            by_dir.setdefault(key, (root, []))[1].append(path.name)
        work: list[NewWork] = []
        for (directory, _), (root, names) in by_dir.items():
            siblings = list_images(directory, root)
            work.extend(self._needing(root, directory, sorted(set(names)), siblings))
        return self.store.enqueue_many(work) if work else 0

    # -- scans ---------------------------------------------------------------------------------

    def scan(self, root: WatchRoot, directory: Path | None = None, reason: str = "scan") -> ScanReport:
        started = time.monotonic()
        directory = directory or root.path
        images = queued = temps = 0
        pending: list[NewWork] = []
        for current, names in _walk(directory, root):
            temps += remove_stale_temps(current)
            images += len(names)
            pending.extend(self._needing(root, current, names, names))
            if len(pending) >= _CHUNK:
                queued += self.store.enqueue_many(pending)
                pending = []
        if pending:
            queued += self.store.enqueue_many(pending)
        report = ScanReport(root.path, directory, reason, images, queued, temps, time.monotonic() - started)
        log.info(
            "scan finished",
            root=str(root.path),
            directory=str(directory),
            reason=reason,
            images=images,
            queued=queued,
            temps_removed=temps,
            seconds=round(report.seconds, 3),
        )
        return report


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _walk(top: Path, root: WatchRoot) -> Iterator[tuple[Path, list[str]]]:
    """Yield (directory, candidate image names) for ``top`` and, if recursive, below it.

    Symlinked directories are not followed (no loops, no escaping the root), symlinked files
    are captioned like files; unreadable
    directories are logged and skipped.
    """
    stack = [top]
    seen: set[tuple[int, int]] = set()
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as e:
            log.warning("cannot scan directory", directory=str(current), error=str(e))
            continue
        names: list[str] = []
        subdirs: list[Path] = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    sub = Path(entry.path)
                    if root.recursive and is_watched_dir(sub, root):
                        subdirs.append(sub)
                elif entry.is_file() and is_candidate(Path(entry.path), root):
                    names.append(entry.name)
            except OSError:
                continue
        names.sort()
        yield current, names
        stack.extend(sorted(subdirs, reverse=True))
