"""The journal's records: what a job is, what the intake enqueues, and what the writer records.

Plain data; ``row_to_job`` reads a ``jobs`` row (``journal_schema``) back into a ``Job``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from phicapd.fsnames import display, from_journal_text, journal_path

#: ``jobs.staged``: 0 no, 1 its files are being written from the staged caption (finish them
#: all), 2 a backfill (write only the outputs it lacks, from the caption it has; forced, a
#: re-form: write them all, in the root's form, ``NewWork.reform``).
STAGED_WRITE = 1
STAGED_BACKFILL = 2


class State(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What identifies one version of an image's bytes without reading them."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    path: Path
    root: Path
    state: State
    attempts: int
    force: bool
    fingerprint: Fingerprint | None
    error_code: str | None = None
    error_message: str | None = None
    sidecar: str | None = None
    updated_at: float = 0.0
    model: str | None = None
    backend: str | None = None
    endpoint: str | None = None
    sha256: str | None = None
    prompt: str | None = None
    caption: str | None = None  # the text last written (or staged) for it, prefix and suffix included
    settings_key: str | None = None  # what made that caption (``outputs.provenance.settings_key``)
    staged: bool = False  # its caption is in the journal and its files may be half written
    backfill: bool = False  # staged to add the outputs it lacks from its journal caption (no model)
    formats: frozenset[str] | None = None  # what its caption was written in (None: not known)


@dataclass(frozen=True, slots=True)
class NewWork:
    """An image that needs a caption, as found by the watcher or a scan."""

    path: Path
    root: Path
    fingerprint: Fingerprint
    force: bool = False
    seen_at: float | None = None  # wall clock when the caller found its sidecar missing or stale
    # It lacks some outputs, and the journal's caption was made from its current bytes: write
    # them from that caption (``Job.backfill``) rather than ask the model again.
    backfill: bool = False
    # With ``force``: its journal caption, made from these bytes, only needs its root's new form
    # (``caption_form``): staged like a backfill, and forced through every output.
    reform: bool = False


@dataclass(frozen=True, slots=True)
class Success:
    job_id: int
    sha256: str
    model: str
    prompt: str
    sidecar: str
    fingerprint: Fingerprint
    backend: str | None = None  # "native", "openai"
    endpoint: str | None = None  # the remote endpoint that made the caption
    caption: str | None = None  # the text written, for staleness and for finishing a staged write
    settings_key: str | None = None
    formats: tuple[str, ...] = ()  # the root's formats, all of which it now has


@dataclass(frozen=True, slots=True)
class Failure:
    job_id: int
    code: str
    message: str
    retryable: bool
    #: The caption did reach some of the image's outputs (one output failed, the others hold it):
    #: recorded as a success records it, so the journal knows what is on disk, while the job is
    #: retried or parked for the output that failed. Its ``formats`` are the outputs written.
    written: Success | None = None
    #: False when it is no fault of the image's (it changed while its caption was written): no
    #: attempt is counted, it is retried after the first back-off step, never parked.
    counted: bool = True


def _message(stored: str | None) -> str | None:
    # A message may quote a name that is not UTF-8: stored reversibly, read for people.
    return display(from_journal_text(stored)) if stored is not None else None


def row_to_job(row: sqlite3.Row) -> Job:
    fp = None
    if row["size"] is not None:
        fp = Fingerprint(row["size"], row["mtime_ns"], row["inode"])
    return Job(
        id=row["id"],
        path=journal_path(row["path"]),
        root=journal_path(row["root"]),
        state=State(row["state"]),
        attempts=row["attempts"],
        force=bool(row["force"]),
        fingerprint=fp,
        error_code=row["error_code"],
        error_message=_message(row["error_message"]),
        sidecar=from_journal_text(row["sidecar"]) if row["sidecar"] is not None else None,
        updated_at=row["updated_at"],
        model=row["model"],
        backend=row["backend"],
        endpoint=row["endpoint"],
        sha256=row["sha256"],
        prompt=row["prompt"],
        caption=row["caption"],
        settings_key=row["settings_key"],
        staged=bool(row["staged"]),
        backfill=row["staged"] == STAGED_BACKFILL,
        formats=frozenset(row["formats"].split(",")) if row["formats"] else None,
    )
