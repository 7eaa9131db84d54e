"""The journal's SQLite schema and its migrations.

``create_or_migrate`` runs in the journal's first write transaction: it creates the tables,
brings an older journal's ``jobs`` up to ``SCHEMA_VERSION`` (columns added, never dropped, so an
older daemon's rows stay readable), and refuses a journal from a newer phicapd.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 5

SCHEMA = """
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


def create_or_migrate(db: sqlite3.Connection, path: Path) -> None:
    """Inside a write transaction on ``db``, the journal at ``path``."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version in (0, 1, 2, 3, 4):
        # 1 -> 2 added the sidecars table (start-up scans fill it); 2 -> 3 added which
        # backend and endpoint made each caption; 3 -> 4 the caption text, its settings
        # key and the staged mark (NULL / 0 for the older ones); 4 -> 5 the formats
        # each caption was written in (NULL: unknown, so the scans look at the files).
        columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (
            ("backend", "TEXT"),
            ("endpoint", "TEXT"),
            ("caption", "TEXT"),
            ("settings_key", "TEXT"),
            ("staged", "INTEGER NOT NULL DEFAULT 0"),
            ("formats", "TEXT"),
        ):
            if column not in columns:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    elif version != SCHEMA_VERSION:
        raise RuntimeError(f"journal {path} has schema {version}, this phicapd knows {SCHEMA_VERSION}")
