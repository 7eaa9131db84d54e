"""The journal: accepted background work in SQLite, so that ``kill -9`` loses nothing.

A job is one image under a watched root: ``pending -> running -> done | failed``. The sidecar
on disk is the truth for "done"; the journal holds what is accepted but not yet done, how
often it failed and why, and what produced each caption (image fingerprint, model, prompt).

The ``sidecars`` table holds which image each sidecar name belongs to (``outputs.naming``'s
claims). Once a sidecar is an image's, through a caption of ours, phicapctl's, or one a scan
found beside it, it stays that image's: a same-stem image that arrives later and sorts first
gets the other name instead of taking over a caption that may have been edited by hand.

SQLite in WAL mode with ``synchronous=FULL``: a committed enqueue or result survives power
loss (only the ``running`` mark, taken on the GPU thread, skips its fsync). All writes are
grouped into few transactions (``enqueue_many``, ``finish_many``) because one fsync per image
would cap the pipeline at a few hundred files per second. Which jobs the decode pool is reading
is kept beside it, outside SQLite (``decode_marks.py``), for the same reason.

This module is the state machine (``Journal``). Beside it: the records (``journal_records``),
the schema and its migrations (``journal_schema``), the intake rule (``journal_intake``), the
reads for status and the scans (``journal_queries``) and the statements of renames and moves
(``journal_moves``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from phicapd.fsnames import journal_text
from phicapd.pipeline import journal_moves
from phicapd.pipeline.decode_marks import DecodeMarks
from phicapd.pipeline.journal_intake import enqueue
from phicapd.pipeline.journal_queries import JournalQueries
from phicapd.pipeline.journal_records import (
    STAGED_BACKFILL,
    STAGED_WRITE,
    Failure,
    Fingerprint,
    Job,
    NewWork,
    State,
    Success,
    row_to_job,
)
from phicapd.pipeline.journal_schema import SCHEMA_VERSION, create_or_migrate

# The journal's records and schema version, importable from here as they always were.
__all__ = [
    "SCHEMA_VERSION",
    "STAGED_BACKFILL",
    "STAGED_WRITE",
    "Failure",
    "Fingerprint",
    "Job",
    "Journal",
    "NewWork",
    "State",
    "Success",
]


def _claim(db: sqlite3.Connection, claims: Iterable[tuple[Path, str]]) -> None:
    """The callers named each sidecar with the claims they read (``SiblingIndex``), so a claim
    this replaces, on the same base or for the same image, is one that no longer binds (its
    image is gone)."""
    db.executemany(
        "INSERT OR REPLACE INTO sidecars (dir, base, image) VALUES (?, ?, ?)",
        [(journal_text(image.parent), journal_text(base), journal_text(image.name)) for image, base in claims],
    )


#: What recording a caption sets, in the order of ``_caption_values``.
_CAPTION_COLUMNS = (
    "sha256",
    "model",
    "backend",
    "endpoint",
    "prompt",
    "sidecar",
    "caption",
    "settings_key",
    "formats",
    "size",
    "mtime_ns",
    "inode",
    "updated_at",
)
_CAPTION_SET = ", ".join(f"{c} = ?" for c in _CAPTION_COLUMNS)


def _caption_values(s: Success, now: float) -> tuple[object, ...]:
    fp = s.fingerprint
    return (
        s.sha256,
        s.model,
        s.backend,
        s.endpoint,
        s.prompt,
        journal_text(s.sidecar),
        s.caption,
        s.settings_key,
        ",".join(s.formats) or None,
        fp.size,
        fp.mtime_ns,
        fp.inode,
        now,
    )


class Journal(JournalQueries):
    """Thread-safe access to the journal: one connection (and lock) for writes, one for reads.

    Every write transaction ends in an fsync. In WAL mode a reader sees the last committed
    state without waiting for a writer, so reads (claiming work, status, counts) get their own
    connection and never queue behind a commit's fsync. The state machine is here; the reads
    that only report are ``JournalQueries``'.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_attempts: int = 3,
        backoff_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx():
            create_or_migrate(self._db, path)
            journal_moves.create_indexes(self._db)  # after the migrations: on their columns
        super().__init__(path, clock)
        self._marks = DecodeMarks(path.with_name(path.name + "-decoding"), fresh=fresh)

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``durable=False`` commits without an fsync (synchronous=NORMAL):
        it survives a crash of the process, and the next durable commit flushes it too."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self._marks.close()
        with self._lock:
            self._db.close()
        self._close_reader()

    # -- start-up ------------------------------------------------------------------------------

    def recover(self) -> int:
        """Return interrupted jobs to pending. Each interruption counts as an attempt and backs
        off like a failure, so the rest of the backlog goes before an image that may have
        brought the daemon down; the scheduler then runs it alone, on the model
        (``interrupted``) or in the decode pool (``interrupted_decoding``: the jobs marked
        decoding, which may hold a file that crashes the image decoder), so only the image that
        did it is blamed again. Parking one that keeps doing so is left to the scheduler too:
        only it can see that the sidecar was written just before the crash."""
        now = self._clock()
        decoding = self._marks.left()
        with self._tx() as db:
            # First, while the jobs the model had are still "running": a job settled or taken by
            # the model since its mark (its clear failed) is not the decoder's.
            in_decoder = db.executemany(
                "UPDATE jobs SET attempts = MAX(attempts, MIN(attempts + 1, ?)), updated_at = ?,"
                " next_attempt_at = ? * (1 << attempts) + ?, error_code = 'interrupted_decoding',"
                " error_message = path || ': the daemon stopped while decoding this image'"
                " WHERE id = ? AND state = 'pending'",
                [(self.max_attempts, now, self.backoff_seconds, now, i) for i in decoding],
            ).rowcount
            # A staged job's caption is already made: it only needs its files, now, and it did
            # not bring the daemon down on the model.
            db.execute(
                "UPDATE jobs SET state = 'pending', next_attempt_at = 0, updated_at = ?"
                " WHERE state = 'running' AND staged != 0",
                (now,),
            )
            on_model = db.execute(
                "UPDATE jobs SET state = 'pending', attempts = MAX(attempts, MIN(attempts + 1, ?)),"
                " updated_at = ?, next_attempt_at = ? * (1 << attempts) + ?, error_code = 'interrupted',"
                " error_message = 'the daemon stopped while this image was on the model'"
                " WHERE state = 'running'",
                (self.max_attempts, now, self.backoff_seconds, now),
            ).rowcount
        if decoding:
            self._marks.reset()  # after the commit: a crash in between counts them again, not never
        return on_model + in_decoder

    # -- intake --------------------------------------------------------------------------------

    def enqueue_many(self, items: Iterable[NewWork]) -> int:
        """Accept work in one transaction; returns how many jobs became pending.

        A job already pending or running is left alone (deduplication). A done job becomes
        pending again (the caller saw that its sidecar is missing or stale), unless it was done
        after the caller looked (``seen_at``). A failed job is
        parked: it stays failed unless the image changed or ``force`` is set.
        """
        now = self._clock()
        with self._tx() as db:
            return sum(enqueue(db, w, now) for w in items)

    # -- the scheduler's side ------------------------------------------------------------------

    def claim(self, limit: int, exclude: set[int] | None = None) -> list[Job]:
        """Up to ``limit`` runnable pending jobs, oldest first, skipping ids already claimed.

        Claiming changes nothing on disk: a job becomes ``running`` only when its batch starts
        (``mark_running``), so a crash counts an attempt only against images that were on the model.
        """
        skip = sorted(exclude or ())
        marks = ",".join("?" * len(skip))
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = 'pending' AND next_attempt_at <= ?"
                f" AND id NOT IN ({marks}) ORDER BY id LIMIT ?",
                (self._clock(), *skip, limit),
            ).fetchall()
        return [row_to_job(r) for r in rows]

    def mark_running(self, job_ids: Sequence[int]) -> None:
        """The model took these jobs. Runs on the GPU thread, so without an fsync: the mark only
        counts attempts against a process crash, which it survives; a power cut losing it costs
        at most one uncounted attempt."""
        now = self._clock()
        with self._tx(durable=False) as db:
            db.executemany(
                "UPDATE jobs SET state = 'running', updated_at = ? WHERE id = ? AND state = 'pending'",
                [(now, i) for i in job_ids],
            )
        for i in job_ids:  # decoded: from now on a crash is the model's (a no-op unless a clear failed)
            self._marks.set(i, False)

    def mark_decoding(self, job_id: int, decoding: bool = True) -> None:
        """The decode pool starts (``decoding``) or stops reading this job's image. If the process
        dies in between (a file that makes a C decoder segfault), ``recover`` counts an attempt
        against it, so such a file is parked in the end instead of crashing every restart. Not a
        journal transaction: see ``decode_marks.py``."""
        self._marks.set(job_id, decoding)

    def stage_many(self, staged: Sequence[Success]) -> None:
        """Record captions before their files are written (more than one file per image): a crash
        between two files is then finished from here at the next start, not captioned again."""
        if not staged:
            return
        now = self._clock()
        with self._tx() as db:
            db.executemany(
                f"UPDATE jobs SET staged = {STAGED_WRITE}, caption = ?, settings_key = ?, sha256 = ?, model = ?,"
                " backend = ?, endpoint = ?, prompt = ?, updated_at = ? WHERE id = ?",
                [
                    (s.caption, s.settings_key, s.sha256, s.model, s.backend, s.endpoint, s.prompt, now, s.job_id)
                    for s in staged
                ],
            )

    def finish_many(
        self,
        successes: Sequence[Success] = (),
        failures: Sequence[Failure] = (),
        skipped: Sequence[int] = (),
        claims: Sequence[tuple[Path, str]] = (),
    ) -> list[Job]:
        """Record finished jobs in one transaction; returns the jobs that are now parked as failed.

        ``skipped`` jobs are done without a new caption (their sidecar was already up to date).
        ``claims`` are the sidecars written or kept for them (see ``claim_sidecars``). A failure
        whose caption reached some outputs records it too (``Failure.written``); a staged one
        stays staged, so its retry (or ``retry``) writes the rest from the journal's caption.
        """
        now = self._clock()
        parked: list[Job] = []
        for i in (*(s.job_id for s in successes), *(f.job_id for f in failures), *skipped):
            self._marks.set(i, False)  # settled: none of a later crash's doing (a no-op as a rule)
        with self._tx() as db:
            _claim(db, claims)
            db.executemany(
                "UPDATE jobs SET state = 'done', force = 0, staged = 0, error_code = NULL, error_message = NULL,"
                " updated_at = ? WHERE id = ?",
                [(now, i) for i in skipped],
            )
            for s in successes:
                db.execute(
                    f"UPDATE jobs SET state = 'done', force = 0, staged = 0, {_CAPTION_SET}, error_code = NULL,"
                    " error_message = NULL WHERE id = ?",
                    (*_caption_values(s, now), s.job_id),
                )
            for f in failures:
                row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (f.job_id,)).fetchone()
                if row is None:
                    continue
                if f.written is not None:
                    values = (*_caption_values(f.written, now), f.job_id)
                    db.execute(f"UPDATE jobs SET {_CAPTION_SET} WHERE id = ?", values)
                # A job whose attempts already reached the limit had its last one counted by
                # ``recover`` (the crash that interrupted it): parking it is not one more.
                attempts = row["attempts"]
                if f.counted:
                    attempts = max(attempts, min(attempts + 1, self.max_attempts))
                if f.retryable and (attempts < self.max_attempts or not f.counted):
                    delay = self.backoff_seconds * 2 ** (attempts - 1) if f.counted else self.backoff_seconds
                    db.execute(
                        "UPDATE jobs SET state = 'pending', attempts = ?, next_attempt_at = ?, error_code = ?,"
                        " error_message = ?, updated_at = ? WHERE id = ?",
                        (attempts, now + delay, f.code, journal_text(f.message), now, f.job_id),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'failed', attempts = ?, error_code = ?, error_message = ?,"
                        " updated_at = ? WHERE id = ?",
                        (attempts, f.code, journal_text(f.message), now, f.job_id),
                    )
                    parked.append(self._get_by_id(db, f.job_id))
        return parked

    def record_captioned(self, path: Path, root: Path, s: Success, claim: str | None = None) -> bool:
        """A caption written by someone else than the writer (phicapctl, ``/v1/captioned``): record
        ``path`` done with it in one transaction, as ``finish_many`` records the writer's
        (``s.job_id`` is ignored), with ``claim`` the sidecar base it keeps. A pending or failed
        job becomes done: its image is captioned. A running one is left alone (the model has it
        and its own caption follows); returns False then."""
        now = self._clock()
        values = _caption_values(s, now)
        with self._tx() as db:
            row = db.execute("SELECT id, state FROM jobs WHERE path = ?", (journal_text(path),)).fetchone()
            if row is not None and row["state"] == State.RUNNING:
                return False
            if row is None:
                db.execute(
                    f"INSERT INTO jobs (path, root, state, {', '.join(_CAPTION_COLUMNS)}, created_at)"
                    f" VALUES (?, ?, 'done', {', '.join('?' * len(_CAPTION_COLUMNS))}, ?)",
                    (journal_text(path), journal_text(root), *values, now),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state = 'done', root = ?, force = 0, staged = 0, attempts = 0,"
                    f" next_attempt_at = 0, error_code = NULL, error_message = NULL, {_CAPTION_SET} WHERE id = ?",
                    (journal_text(root), *values, row["id"]),
                )
            if claim is not None:
                _claim(db, [(path, claim)])
        return True

    def release(self, job_ids: Iterable[int]) -> int:
        """Hand claimed jobs back (shutdown): running -> pending, no attempt counted."""
        now = self._clock()
        ids = list(job_ids)
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'running'",
                [(now, i) for i in ids],
            )
        return len(ids)

    def forget(self, path: Path) -> None:
        """The image is gone: drop its job unless it is being captioned right now."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE path = ? AND state != 'running'", (journal_text(path),))
            db.execute(
                "DELETE FROM sidecars WHERE dir = ? AND image = ?", (journal_text(path.parent), journal_text(path.name))
            )

    # -- renames and moves (``pipeline.moves``; the statements are ``journal_moves``') --------

    def adopt(self, adoption: journal_moves.Adoption) -> bool:
        """An image takes over another path's caption (``journal_moves.adopt``)."""
        with self._tx() as db:
            return journal_moves.adopt(db, adoption, self._clock())

    def move_tree(self, source: Path, target: Path, root: Path) -> int:
        """The directory ``source`` was renamed ``target``: its jobs and claims follow."""
        with self._tx() as db:
            return journal_moves.move_tree(db, source, target, root)

    # -- sidecar claims ------------------------------------------------------------------------

    def claim_sidecars(self, claims: Sequence[tuple[Path, str]]) -> None:
        """Record that the sidecar base ``base`` belongs to ``image``, for each (image, base)."""
        if claims:
            with self._tx() as db:
                _claim(db, claims)

    def drop_claims(self, directory: Path, images: Iterable[str]) -> None:
        """Forget the claims of images that are gone from ``directory``."""
        rows = [(journal_text(directory), journal_text(name)) for name in images]
        if rows:
            with self._tx() as db:
                db.executemany("DELETE FROM sidecars WHERE dir = ? AND image = ?", rows)

    # -- operator actions ----------------------------------------------------------------------

    def retry(self, paths: Sequence[str] | None = None) -> int:
        """Re-queue failed jobs (all of them, or those at ``paths``) with a fresh attempt count."""
        now = self._clock()
        with self._tx() as db:
            base = (
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = 0, force = 1,"
                " updated_at = ? WHERE state = 'failed'"
            )
            if paths is None:
                return db.execute(base, (now,)).rowcount
            return sum(db.execute(base + " AND path = ?", (now, journal_text(p))).rowcount for p in paths)

    # -- reads ---------------------------------------------------------------------------------

    def _get_by_id(self, db: sqlite3.Connection, job_id: int) -> Job:
        return row_to_job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
