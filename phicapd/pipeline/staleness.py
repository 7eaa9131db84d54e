"""Stale captions: made with other settings than their root's current ones.

Every caption the writer records carries a settings key (``pipeline.formats.settings_key``:
model, revision, prompt, prefix/suffix, generation settings) and the text it wrote. A caption
whose key differs from what its root would use now is *stale*. One whose file no longer holds
the text the daemon wrote (a person edited it, or another tool replaced it) is *edited*: it is
listed apart and never redone unless forced, under every policy, automatic redo included.
Captions from before the journal kept keys (schema < 4) have none and are never called stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from phicapd.config import JSON_EXTENSION, Settings, WatchRoot
from phicapd.pipeline.formats import read_json_caption, settings_key
from phicapd.pipeline.jobs import Fingerprint, Job, JobStore, NewWork


class NotWatched(ValueError):
    """The directory asked about is under no watch root."""


@dataclass(slots=True)
class StaleReport:
    stale: list[tuple[Job, WatchRoot]] = field(default_factory=list)
    edited: list[tuple[Job, WatchRoot]] = field(default_factory=list)


def roots_for(settings: Settings, directory: Path | None) -> list[tuple[WatchRoot, Path | None]]:
    """The roots ``directory`` concerns, each with the part of it to look at (None: all)."""
    if directory is None:
        return [(root, None) for root in settings.watch]
    out: list[tuple[WatchRoot, Path | None]] = []
    for root in settings.watch:
        if directory.is_relative_to(root.path):
            out.append((root, None if directory == root.path else directory))
        elif root.path.is_relative_to(directory):
            out.append((root, None))
    if not out:
        raise NotWatched(f"{directory} is under no watch root")
    return out


def find_stale(settings: Settings, store: JobStore, identity: str, directory: Path | None) -> StaleReport:
    """The stale and the edited captions under ``directory`` (every root when None)."""
    report = StaleReport()
    for root, under in roots_for(settings, directory):
        current = settings_key(settings, root, identity)
        for job in store.captioned(root.path, under):
            if job.settings_key == current:
                continue
            (report.edited if _edited(job, settings.per_image_extensions(root)) else report.stale).append((job, root))
    return report


def _edited(job: Job, extensions: list[str]) -> bool:
    """Whether a file the daemon wrote for ``job`` holds something else now. A missing file is
    not an edit: the scans give it a caption anyway."""
    assert job.caption is not None
    if job.sidecar is None:
        return True
    primary = Path(job.sidecar)
    base = primary.name[: -len(primary.suffix)] if primary.suffix else primary.name
    for path in (primary.with_name(base + extension) for extension in extensions):
        if path.name.endswith(JSON_EXTENSION):
            if path.exists() and read_json_caption(path) != job.caption:
                return True
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return True
        if text.rstrip("\n") != job.caption.rstrip("\n"):
            return True
    return False


def requeue(store: JobStore, entries: list[tuple[Job, WatchRoot]]) -> int:
    """Queue the images of ``entries`` for a new caption that replaces theirs under every policy."""
    work: list[NewWork] = []
    for job, root in entries:
        try:
            st = os.stat(job.path)
        except OSError:
            continue  # gone: the watcher forgets it
        work.append(NewWork(job.path, root.path, Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino), force=True))
    return store.enqueue_many(work)
