"""Stale captions: made with other settings than their root's current ones.

Every caption the writer records carries a settings key (``outputs.provenance.settings_key``:
model, revision, prompt, prefix/suffix, generation settings) and the text it wrote. A caption
whose key differs from what its root would use now is *stale*. One whose output no longer holds
the text the daemon wrote (a person edited the ``.txt``, the XMP description in digiKam, the
manifest line; or another tool replaced it) is *edited*: it is listed apart and never redone
unless forced, under every policy, automatic redo included.

Captions from before the journal kept keys and texts (schema < 4) are judged by what it kept
then: stale when their model or prompt differs from the root's current one, edited when their
file is newer than the journal's record of writing it.

A stale caption that differs only in being written on several lines where its root is now
``single_line`` is *reformable* (``caption_form``): ``requeue`` has it re-formed from the
journal, with no model call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from phicapd.caption_form import reformable
from phicapd.config import Settings, WatchRoot
from phicapd.log import get_logger
from phicapd.outputs import metadata
from phicapd.outputs.formats.jsonl import read_manifest
from phicapd.outputs.provenance import model_and_revision, settings_key
from phicapd.outputs.root import RootOutputs
from phicapd.pipeline.journal import Fingerprint, Job, Journal, NewWork

log = get_logger(__name__)


class NotWatched(ValueError):
    """The directory asked about is under no watch root."""


@dataclass(slots=True)
class StaleReport:
    stale: list[tuple[Job, WatchRoot]] = field(default_factory=list)
    edited: list[tuple[Job, WatchRoot]] = field(default_factory=list)
    reform: set[int] = field(default_factory=set)  # ids of the stale ones the journal can re-form


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


def find_stale(settings: Settings, store: Journal, identity: str, directory: Path | None) -> StaleReport:
    """The stale and the edited captions under ``directory`` (every root when None)."""
    report = StaleReport()
    manifests: Callable[[Path], dict[str, str]] = cache(_manifest_entries)
    for root, under in roots_for(settings, directory):
        current = settings_key(settings, root, identity)
        unformed = settings_key(settings, root.model_copy(update={"single_line": False}), identity)
        outputs = RootOutputs.of(settings, root)
        prompt = settings.prompt_for(root)
        for job in store.captioned(root.path, under):
            if job.settings_key is None:  # from before keys: what was recorded then decides
                if job.model in (identity, model_and_revision(identity)[0]) and job.prompt == prompt:
                    continue
                edited = _newer_than_recorded(job)
            elif job.settings_key == current:
                continue
            else:
                edited = _edited(job, outputs, manifests)
            (report.edited if edited else report.stale).append((job, root))
            if not edited and reformable(root, job.settings_key, unformed):
                report.reform.add(job.id)
    return report


def _manifest_entries(directory: Path) -> dict[str, str]:
    """``directory``'s manifest; one that cannot be read (a pipe, over its cap: ``safe_files``)
    lists nobody, so it marks no caption edited."""
    try:
        return read_manifest(directory)
    except OSError:
        return {}


def _edited(job: Job, outputs: RootOutputs, manifests: Callable[[Path], dict[str, str]]) -> bool:
    """Whether an output the daemon wrote for ``job`` holds another caption now. A missing one is
    not an edit: the scans give it the caption back."""
    assert job.caption is not None
    caption = job.caption.rstrip("\n")
    if job.sidecar is None:
        return True
    held = outputs.held(job.path, outputs.base_of(job.path, Path(job.sidecar)))
    if any(text != caption for text in held.values()):
        return True
    if metadata.described_by_others(outputs.embedded_all(job.path), caption):
        return True
    if "jsonl" in outputs.formats:
        listed = manifests(job.path.parent).get(job.path.name)
        if listed is not None and listed != caption:
            return True
    return False


def _newer_than_recorded(job: Job) -> bool:
    """A caption from before texts were kept: edited if its file changed after it was recorded."""
    if job.sidecar is None:
        return True
    try:
        return os.stat(job.sidecar).st_mtime > job.updated_at
    except OSError:
        return False


def requeue(store: Journal, entries: list[tuple[Job, WatchRoot]], reform: Collection[int] = ()) -> int:
    """Queue the images of ``entries`` for a new caption that replaces theirs under every policy;
    those in ``reform`` (job ids: ``StaleReport.reform``) get their journal caption re-formed."""
    work: list[NewWork] = []
    for job, root in entries:
        try:
            st = os.stat(job.path)
        except OSError:
            continue  # gone: the watcher forgets it
        fp = Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)
        work.append(NewWork(job.path, root.path, fp, force=True, reform=job.id in reform))
    return store.enqueue_many(work)


def restale_auto(settings: Settings, store: Journal, identity: str) -> None:
    """``restale = "auto"`` roots: queue their stale captions again (the daemon does, at start and
    after a reload); edited ones are kept."""
    for root in settings.watch:
        if settings.restale_for(root) == "auto":
            report = find_stale(settings, store, identity, root.path)
            if report.stale:
                n = requeue(store, report.stale, report.reform)
                log.info("recaption", root=str(root.path), requeued=n, edited_kept=len(report.edited), auto=True)
