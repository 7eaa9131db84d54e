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
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from phicapd.fsnames import display, from_journal_text, journal_path, journal_text
from phicapd.pipeline import journal_moves
from phicapd.pipeline.decode_marks import DecodeMarks

SCHEMA_VERSION = 5
#: ``jobs.staged``: 0 no, 1 its files are being written from the staged caption (finish them
#: all), 2 a backfill (write only the outputs it lacks, from the caption it has; forced, a
#: re-form: write them all, in the root's form, ``NewWork.reform``).
STAGED_WRITE = 1
STAGED_BACKFILL = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY,
    path            TEXT NOT NULL UNIQUE,
    root            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    force           INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    size            INTEGER,
    mtime_ns        INTEGER,
    inode           INTEGER,
    sha256          TEXT,
    model           TEXT,
    backend         TEXT,
    endpoint        TEXT,
    prompt          TEXT,
    sidecar         TEXT,
    caption         TEXT,
    settings_key    TEXT,
    staged          INTEGER NOT NULL DEFAULT 0,
    formats         TEXT,
    error_code      TEXT,
    error_message   TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (state, next_attempt_at, id);
-- Failures by code for status: a 100,000-job backlog is not scanned on every status call.
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (state, error_code) WHERE state = 'failed' OR attempts > 0;
CREATE TABLE IF NOT EXISTS sidecars (
    dir     TEXT NOT NULL,
    base    TEXT NOT NULL,
    image   TEXT NOT NULL,
    PRIMARY KEY (dir, base),
    UNIQUE (dir, image)
) WITHOUT ROWID;
"""


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


def _message(stored: str | None) -> str | None:
    # A message may quote a name that is not UTF-8: stored reversibly, read for people.
    return display(from_journal_text(stored)) if stored is not None else None


def _row_to_job(row: sqlite3.Row) -> Job:
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


class JobStore:
    """Thread-safe access to the journal: one connection (and lock) for writes, one for reads.

    Every write transaction ends in an fsync. In WAL mode a reader sees the last committed
    state without waiting for a writer, so reads (claiming work, status, counts) get their own
    connection and never queue behind a commit's fsync.
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
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version in (0, 1, 2, 3, 4):
                # 1 -> 2 added the sidecars table (start-up scans fill it); 2 -> 3 added which
                # backend and endpoint made each caption; 3 -> 4 the caption text, its settings
                # key and the staged mark (NULL / 0 for the older ones); 4 -> 5 the formats
                # each caption was written in (NULL: unknown, so the scans look at the files).
                columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
                for column, kind in (
                    ("backend", "TEXT"),
                    ("endpoint", "TEXT"),
                    ("caption", "TEXT"),
                    ("settings_key", "TEXT"),
                    ("staged", "INTEGER NOT NULL DEFAULT 0"),
                    ("formats", "TEXT"),
                ):
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise RuntimeError(f"journal {path} has schema {version}, this phicapd knows {SCHEMA_VERSION}")
            journal_moves.create_indexes(self._db)  # after the migrations: on their columns
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._reader.row_factory = sqlite3.Row
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
        with self._read_lock:
            self._reader.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The read connection; each statement sees the latest commit (autocommit mode)."""
        with self._read_lock:
            yield self._reader

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
        added = 0
        with self._tx() as db:
            for w in items:
                fp = w.fingerprint
                row = db.execute(
                    "SELECT id, state, size, mtime_ns, inode, caption, updated_at FROM jobs WHERE path = ?",
                    (journal_text(w.path),),
                ).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO jobs (path, root, state, force, size, mtime_ns, inode, created_at, updated_at)"
                        " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                        (
                            journal_text(w.path),
                            journal_text(w.root),
                            int(w.force),
                            fp.size,
                            fp.mtime_ns,
                            fp.inode,
                            now,
                            now,
                        ),
                    )
                    added += 1
                    continue
                state = row["state"]
                changed = (row["size"], row["mtime_ns"], row["inode"]) != (fp.size, fp.mtime_ns, fp.inode)
                if state in ("pending", "running"):
                    if changed or w.force:
                        # Other bytes (or a forced caption): a backfill from the old caption is off.
                        db.execute(
                            "UPDATE jobs SET size = ?, mtime_ns = ?, inode = ?, force = force | ?,"
                            f" staged = CASE staged WHEN {STAGED_BACKFILL} THEN 0 ELSE staged END,"
                            " updated_at = ? WHERE id = ?",
                            (fp.size, fp.mtime_ns, fp.inode, int(w.force), now, row["id"]),
                        )
                    continue
                if state == "failed" and not changed and not w.force:
                    continue
                stale_look = w.seen_at is not None and row["updated_at"] >= w.seen_at
                if state == "done" and not changed and not w.force and stale_look:
                    # Captioned after the caller looked (a scan racing the writer): the sidecar it
                    # found missing is there now, so this would be a second caption.
                    continue
                from_journal = w.reform if w.force else w.backfill
                backfill = from_journal and state == "done" and not changed and row["caption"] is not None
                db.execute(
                    "UPDATE jobs SET state = 'pending', root = ?, force = ?, attempts = 0, next_attempt_at = 0,"
                    " staged = ?, size = ?, mtime_ns = ?, inode = ?, error_code = NULL, error_message = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (
                        journal_text(w.root),
                        int(w.force),
                        STAGED_BACKFILL if backfill else 0,
                        fp.size,
                        fp.mtime_ns,
                        fp.inode,
                        now,
                        row["id"],
                    ),
                )
                added += 1
        return added

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
        return [_row_to_job(r) for r in rows]

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

    def sizes_captioned(self, sizes: Sequence[int]) -> set[int]:
        """Which of ``sizes`` a caption of ours was made from bytes of."""
        with self._read() as db:
            return journal_moves.sizes_captioned(db, sizes)

    def captions_of(self, *, fingerprint: Fingerprint | None = None, sha256: str | None = None) -> list[Job]:
        """Done jobs with a caption of ours made from the bytes of ``fingerprint`` (or ``sha256``)."""
        with self._read() as db:
            return [_row_to_job(r) for r in journal_moves.captions_of(db, fingerprint, sha256)]

    def adopt(self, adoption: journal_moves.Adoption) -> bool:
        """An image takes over another path's caption (``journal_moves.adopt``)."""
        with self._tx() as db:
            return journal_moves.adopt(db, adoption, self._clock())

    def move_tree(self, source: Path, target: Path, root: Path) -> int:
        """The directory ``source`` was renamed ``target``: its jobs and claims follow."""
        with self._tx() as db:
            return journal_moves.move_tree(db, source, target, root)

    def jobs_under(self, directory: Path) -> list[Job]:
        """Every job of an image below ``directory``."""
        with self._read() as db:
            return [_row_to_job(r) for r in journal_moves.paths_under(db, directory)]

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

    def claims_in(self, directory: Path) -> dict[str, str]:
        """Every claim in ``directory``: image name -> sidecar base."""
        with self._read() as db:
            rows = db.execute("SELECT image, base FROM sidecars WHERE dir = ?", (journal_text(directory),)).fetchall()
        return {from_journal_text(r["image"]): from_journal_text(r["base"]) for r in rows}

    def claims_near(self, image: Path) -> dict[str, str]:
        """The claims that can bear on ``image``'s sidecar name: image name -> base.

        Every name the rule relates to an image (its stem chain and their plain, full and
        ``name.N`` bases) starts with the image name's first dot-separated part, and so does
        every claim's image and base; one range on the index finds them in a huge directory.
        """
        prefix = image.name.split(".", 1)[0]
        with self._read() as db:
            rows = db.execute(
                "SELECT image, base FROM sidecars WHERE dir = ? AND image >= ? AND image < ?",
                (journal_text(image.parent), journal_text(prefix), journal_text(prefix) + "\U0010ffff"),
            ).fetchall()
        return {from_journal_text(r["image"]): from_journal_text(r["base"]) for r in rows}

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
        return _row_to_job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get(self, path: Path) -> Job | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE path = ?", (journal_text(path),)).fetchone()
        return _row_to_job(row) if row else None

    def records(self, paths: Sequence[Path]) -> dict[Path, Job]:
        """The jobs of ``paths``: for the done ones, what this daemon captioned, from which bytes,
        into what; for the failed ones, which bytes were parked."""
        out: dict[Path, Job] = {}
        with self._read() as db:
            for chunk_start in range(0, len(paths), 500):
                chunk = paths[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                for row in db.execute(f"SELECT * FROM jobs WHERE path IN ({marks})", [journal_text(p) for p in chunk]):
                    out[journal_path(row["path"])] = _row_to_job(row)
        return out

    def captioned(self, root: Path, under: Path | None = None) -> list[Job]:
        """Done jobs of ``root`` (below ``under``, if given) that hold a caption of ours: with its
        text and settings key, or from before they were kept (schema < 4) with its model."""
        # A range, not substr(): substr stops at the NUL of an escaped name (``fsnames``).
        prefix = journal_text(under or root).rstrip("/") + "/"
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE root = ? AND state = 'done'"
                " AND (settings_key IS NOT NULL AND caption IS NOT NULL"
                " OR settings_key IS NULL AND model IS NOT NULL AND sidecar IS NOT NULL)"
                " AND path >= ? AND path < ? ORDER BY path",
                (journal_text(root), prefix, prefix[:-1] + "0"),
            ).fetchall()
        return [_row_to_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s.value: 0 for s in State}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def runnable_count(self) -> int:
        with self._read() as db:
            return db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND next_attempt_at <= ?", (self._clock(),)
            ).fetchone()[0]

    def backing_off(self) -> tuple[int, float | None]:
        """Pending jobs waiting out a retry back-off: how many, and seconds until the first is due."""
        now = self._clock()
        with self._read() as db:
            n, first = db.execute(
                "SELECT COUNT(*), MIN(next_attempt_at) FROM jobs WHERE state = 'pending' AND next_attempt_at > ?",
                (now,),
            ).fetchone()
        return n, (None if first is None else max(0.0, first - now))

    def next_wakeup(self) -> float | None:
        """When the earliest backed-off job becomes runnable (wall clock), if any."""
        with self._read() as db:
            row = db.execute("SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'pending'").fetchone()
        return row[0]

    def failures(self, limit: int = 100) -> list[Job]:
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = 'failed' OR (state = 'pending' AND attempts > 0)"
                " ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_row_to_job(r) for r in rows]

    def failure_counts(self) -> list[tuple[str, str, int]]:
        """(state, code, jobs) for what ``failures`` lists: parked, and waiting to be retried."""
        with self._read() as db:
            rows = db.execute(
                "SELECT state, COALESCE(error_code, 'unknown') AS code, COUNT(*) AS n FROM jobs"
                " WHERE (state = 'failed' OR attempts > 0) AND state IN ('failed', 'pending')"
                " GROUP BY state, code ORDER BY state, code"
            ).fetchall()
        return [(r["state"], r["code"], r["n"]) for r in rows]

    def integrity_check(self) -> str:
        with self._read() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
