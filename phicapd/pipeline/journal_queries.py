"""Reads of the journal: status counts, failures, back-offs, records, claims, captions of ours.

Apart from the state machine in ``journal.Journal`` (which inherits these): every read here goes
through its own connection, so in WAL mode it sees the last commit without queueing behind a
writer's fsync.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from phicapd.fsnames import from_journal_text, journal_path, journal_text
from phicapd.pipeline import journal_moves
from phicapd.pipeline.journal_records import Fingerprint, Job, State, row_to_job


class JournalQueries:
    """The journal's read side: one connection, its own lock."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._reader.row_factory = sqlite3.Row

    def _close_reader(self) -> None:
        with self._read_lock:
            self._reader.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The read connection; each statement sees the latest commit (autocommit mode)."""
        with self._read_lock:
            yield self._reader

    def get(self, path: Path) -> Job | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE path = ?", (journal_text(path),)).fetchone()
        return row_to_job(row) if row else None

    def records(self, paths: Sequence[Path]) -> dict[Path, Job]:
        """The jobs of ``paths``: for the done ones, what this daemon captioned, from which bytes,
        into what; for the failed ones, which bytes were parked."""
        out: dict[Path, Job] = {}
        with self._read() as db:
            for chunk_start in range(0, len(paths), 500):
                chunk = paths[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                for row in db.execute(f"SELECT * FROM jobs WHERE path IN ({marks})", [journal_text(p) for p in chunk]):
                    out[journal_path(row["path"])] = row_to_job(row)
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
        return [row_to_job(r) for r in rows]

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
        return [row_to_job(r) for r in rows]

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

    def sizes_captioned(self, sizes: Sequence[int]) -> set[int]:
        """Which of ``sizes`` a caption of ours was made from bytes of."""
        with self._read() as db:
            return journal_moves.sizes_captioned(db, sizes)

    def captions_of(self, *, fingerprint: Fingerprint | None = None, sha256: str | None = None) -> list[Job]:
        """Done jobs with a caption of ours made from the bytes of ``fingerprint`` (or ``sha256``)."""
        with self._read() as db:
            return [row_to_job(r) for r in journal_moves.captions_of(db, fingerprint, sha256)]

    def jobs_under(self, directory: Path) -> list[Job]:
        """Every job of an image below ``directory``."""
        with self._read() as db:
            return [row_to_job(r) for r in journal_moves.paths_under(db, directory)]
