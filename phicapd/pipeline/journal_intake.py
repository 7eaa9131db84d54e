"""What accepting work does to a job's row: the journal's intake rule (``Journal.enqueue_many``).

A job already pending or running is left alone (deduplication). A done job becomes pending
again (the caller saw that its sidecar is missing or stale), unless it was done after the
caller looked (``seen_at``). A failed job is parked: it stays failed unless the image changed
or ``force`` is set.
"""

from __future__ import annotations

import sqlite3

from phicapd.fsnames import journal_text
from phicapd.pipeline.journal_records import STAGED_BACKFILL, NewWork


def enqueue(db: sqlite3.Connection, w: NewWork, now: float) -> bool:
    """Inside a write transaction: True when the job became pending."""
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
        return True
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
        return False
    if state == "failed" and not changed and not w.force:
        return False
    stale_look = w.seen_at is not None and row["updated_at"] >= w.seen_at
    if state == "done" and not changed and not w.force and stale_look:
        # Captioned after the caller looked (a scan racing the writer): the sidecar it
        # found missing is there now, so this would be a second caption.
        return False
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
    return True
