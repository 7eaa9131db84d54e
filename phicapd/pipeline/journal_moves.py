"""The journal's side of renames and moves: a caption that changes path, never hands.

``Journal`` runs these statements in its own transactions (``Journal.adopt``,
``Journal.move_tree``); ``pipeline.moves`` decides when. An image that takes over the caption of
another path (its old name, or a copy's original) gets that row's caption, sha256, model and
settings key as they are, so ``phicapctl stale`` judges it as it judged the original; the old row
goes in the same transaction when its image is gone (a move), and stays when it is not (a copy).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phicapd.fsnames import journal_text

if TYPE_CHECKING:
    from phicapd.pipeline.journal import Fingerprint, Job

#: ``jobs.staged`` of a backfill (``jobs.STAGED_BACKFILL``; repeated here, jobs imports this module).
_BACKFILL = 2


@dataclass(frozen=True, slots=True)
class Adoption:
    """``path`` takes over the caption of the journal row ``source``."""

    source: Job
    path: Path
    root: Path
    fingerprint: Fingerprint
    moved: bool  # the source's image is gone: its row and claim go (else a copy: they stay)
    sidecar: str | None  # the primary output of ``path`` now
    formats: tuple[str, ...]  # the outputs of ``path`` that hold the caption now
    complete: bool  # every output the root writes is there: done; else a backfill writes the rest
    claim: str | None  # the sidecar base of ``path``, for roots with per-image files


_COLUMNS = (
    "path, root, state, staged, sha256, model, backend, endpoint, prompt, sidecar, caption, settings_key,"
    " formats, size, mtime_ns, inode, created_at, updated_at"
)
_UPSERT = (
    f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
    " ON CONFLICT(path) DO UPDATE SET root = excluded.root, state = excluded.state, staged = excluded.staged,"
    " force = 0, attempts = 0, next_attempt_at = 0, error_code = NULL, error_message = NULL,"
    " sha256 = excluded.sha256, model = excluded.model, backend = excluded.backend, endpoint = excluded.endpoint,"
    " prompt = excluded.prompt, sidecar = excluded.sidecar, caption = excluded.caption,"
    " settings_key = excluded.settings_key, formats = excluded.formats, size = excluded.size,"
    " mtime_ns = excluded.mtime_ns, inode = excluded.inode, updated_at = excluded.updated_at"
    " WHERE jobs.state != 'running'"
)


def adopt(db: sqlite3.Connection, a: Adoption, now: float) -> bool:
    """Record ``a``; False when the model has ``a.path`` already (its own caption follows)."""
    s, fp = a.source, a.fingerprint
    # The source's own row, by id: a row at its old path since then is another image's.
    if a.moved and db.execute("DELETE FROM jobs WHERE id = ? AND state != 'running'", (s.id,)).rowcount:
        db.execute(
            "DELETE FROM sidecars WHERE dir = ? AND image = ?", (journal_text(s.path.parent), journal_text(s.path.name))
        )
    values = (
        journal_text(a.path),
        journal_text(a.root),
        "done" if a.complete else "pending",
        0 if a.complete else _BACKFILL,
        s.sha256,
        s.model,
        s.backend,
        s.endpoint,
        s.prompt,
        journal_text(a.sidecar) if a.sidecar is not None else None,
        s.caption,
        s.settings_key,
        ",".join(a.formats) or None,
        fp.size,
        fp.mtime_ns,
        fp.inode,
        now,
        now,
    )
    if db.execute(_UPSERT, values).rowcount == 0:
        return False
    if a.claim is not None:
        db.execute(
            "INSERT OR REPLACE INTO sidecars (dir, base, image) VALUES (?, ?, ?)",
            (journal_text(a.path.parent), journal_text(a.claim), journal_text(a.path.name)),
        )
    return True


_CAPTIONED = "state = 'done' AND caption IS NOT NULL AND sha256 IS NOT NULL"


def sizes_captioned(db: sqlite3.Connection, sizes: Sequence[int]) -> set[int]:
    """Which of ``sizes`` a caption of ours was made from bytes of (the index ``jobs_identity``)."""
    found: set[int] = set()
    for start in range(0, len(sizes), 500):
        chunk = sizes[start : start + 500]
        query = f"SELECT DISTINCT size FROM jobs WHERE size IN ({','.join('?' * len(chunk))}) AND {_CAPTIONED}"
        found.update(r[0] for r in db.execute(query, chunk))
    return found


def captions_of(db: sqlite3.Connection, fingerprint: Fingerprint | None, sha256: str | None) -> list[sqlite3.Row]:
    """Done rows with a caption of ours made from these bytes: known by their fingerprint
    (``jobs_identity``) or by their sha256 (``jobs_sha256``)."""
    if fingerprint is not None:
        fp = fingerprint
        where, values = "size = ? AND mtime_ns = ? AND inode = ?", (fp.size, fp.mtime_ns, fp.inode)
    else:
        where, values = "sha256 = ?", (sha256,)
    return db.execute(f"SELECT * FROM jobs WHERE {where} AND {_CAPTIONED} ORDER BY id", values).fetchall()


def create_indexes(db: sqlite3.Connection) -> None:
    """Captions by their bytes, so a new image is matched without a scan of the journal; one of a
    size no caption has is no rename or copy, known without reading it."""
    db.execute("CREATE INDEX IF NOT EXISTS jobs_identity ON jobs (size, mtime_ns, inode)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_sha256 ON jobs (sha256)")
    db.execute("DROP INDEX IF EXISTS jobs_size")


def _under(db: sqlite3.Connection, table: str, column: str, top: str) -> list[sqlite3.Row]:
    # A range, not substr() or LIKE: substr stops at the NUL of an escaped name (``fsnames``).
    prefix = top.rstrip("/") + "/"
    return db.execute(
        f"SELECT * FROM {table} WHERE {column} = ? OR ({column} >= ? AND {column} < ?)",
        (top, prefix, prefix[:-1] + "0"),
    ).fetchall()


def _moved(text: str, source: str, target: str) -> str:
    return target + text[len(source) :]


def move_tree(db: sqlite3.Connection, source: Path, target: Path, root: Path) -> int:
    """Every row and claim below the directory ``source`` now lies below ``target`` (the directory
    was renamed; its images' outputs came along). A row already at a new path (an image removed
    since) gives way. Returns how many jobs moved."""
    old, new = journal_text(source), journal_text(target)
    rows = [r for r in _under(db, "jobs", "path", old) if r["path"] != old]
    for r in rows:
        path = _moved(r["path"], old, new)
        sidecar = r["sidecar"]
        if sidecar is not None and (sidecar == old or sidecar.startswith(old.rstrip("/") + "/")):
            sidecar = _moved(sidecar, old, new)
        db.execute("DELETE FROM jobs WHERE path = ? AND id != ?", (path, r["id"]))
        db.execute(
            "UPDATE jobs SET path = ?, root = ?, sidecar = ? WHERE id = ?", (path, journal_text(root), sidecar, r["id"])
        )
    claims = _under(db, "sidecars", "dir", old)
    db.executemany("DELETE FROM sidecars WHERE dir = ? AND base = ?", [(c["dir"], c["base"]) for c in claims])
    db.executemany(
        "INSERT OR REPLACE INTO sidecars (dir, base, image) VALUES (?, ?, ?)",
        [(_moved(c["dir"], old, new), c["base"], c["image"]) for c in claims],
    )
    return len(rows)


def paths_under(db: sqlite3.Connection, top: Path) -> Sequence[sqlite3.Row]:
    """The rows of images below the directory ``top``."""
    old = journal_text(top)
    return [r for r in _under(db, "jobs", "path", old) if r["path"] != old]
