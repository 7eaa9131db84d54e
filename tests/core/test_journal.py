"""The journal: states, deduplication, back-off, parking, recovery after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from phicapd.pipeline.journal import SCHEMA_VERSION, Failure, Fingerprint, Journal, NewWork, State, Success


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(tmp_path: Path, clock: Clock | None = None) -> Journal:
    return Journal(tmp_path / "j.sqlite3", max_attempts=3, backoff_seconds=10, clock=clock or Clock())


def _work(name: str, size: int = 1) -> NewWork:
    return NewWork(Path("/r") / name, Path("/r"), Fingerprint(size, 5, 9))


def test_enqueue_dedupes_pending_and_running(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.enqueue_many([_work("a"), _work("b")]) == 2
    assert store.enqueue_many([_work("a")]) == 0
    jobs = store.claim(10)
    assert [j.path.name for j in jobs] == ["a", "b"]
    assert store.claim(10, exclude={jobs[0].id}) == [jobs[1]]
    store.mark_running([j.id for j in jobs])
    assert store.enqueue_many([_work("a")]) == 0
    assert store.counts()["running"] == 2
    assert store.claim(10) == []


def test_done_job_requeued_when_asked_failed_job_parked_until_it_changes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work("a"), _work("b")])
    a, b = store.claim(10)
    store.finish_many(
        [Success(a.id, "sha", "m", "p", "/r/a.txt", a.fingerprint)],  # type: ignore[arg-type]
        [Failure(b.id, "image_corrupt", "b: broken", retryable=False)],
    )
    assert store.get(a.path).state is State.DONE
    assert store.get(b.path).state is State.FAILED
    assert store.enqueue_many([_work("b")]) == 0  # parked: same bytes
    assert store.enqueue_many([_work("b", size=2)]) == 1  # the image changed
    assert store.enqueue_many([_work("a")]) == 1  # caller saw the sidecar missing


def test_retryable_failure_backs_off_then_parks(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    store.enqueue_many([_work("a")])
    for attempt in (1, 2):
        (job,) = store.claim(1)
        store.finish_many(failures=[Failure(job.id, "caption_failed", "boom", retryable=True)])
        assert store.claim(1) == []  # backing off
        clock.now += 10 * 2 ** (attempt - 1)
    (job,) = store.claim(1)
    parked = store.finish_many(failures=[Failure(job.id, "caption_failed", "boom", retryable=True)])
    assert [j.path.name for j in parked] == ["a"]
    assert store.get(job.path).attempts == 3 and store.get(job.path).state is State.FAILED
    assert store.retry(None) == 1
    assert store.claim(1)[0].force


def test_recover_returns_running_jobs_counting_an_attempt_each_time(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    store.enqueue_many([_work("a")])
    for attempt in range(1, 4):
        store.mark_running([j.id for j in store.claim(1)])
        assert store.recover() == 1
        job = store.get(Path("/r/a"))
        assert job.state is State.PENDING and job.attempts == attempt  # parking is the scheduler's call
        clock.now += 1000  # past its back-off


def test_a_recovered_job_backs_off_behind_the_rest_of_the_backlog(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    store.enqueue_many([_work("a"), _work("b")])
    store.mark_running([store.claim(1)[0].id])  # "a" was on the model when the daemon died
    store.recover()
    assert [j.path.name for j in store.claim(5)] == ["b"]
    clock.now += 10  # backoff_seconds * 2**0
    assert [j.path.name for j in store.claim(5)] == ["a", "b"]


def test_only_the_running_mark_skips_the_fsync(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work("a"), _work("b")])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.mark_running([j.id for j in store.claim(2)])
    marked, statements[:] = list(statements), []
    store.finish_many(skipped=[store.get(Path("/r/a")).id])
    assert marked[0] == "PRAGMA synchronous=NORMAL" and marked[-1] == "PRAGMA synchronous=FULL"
    assert not any("synchronous" in s for s in statements)  # results commit with the connection's FULL
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_scan_that_looked_before_the_caption_landed_does_not_queue_it_again(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    store.enqueue_many([_work("a")])
    looked = clock.now + 1  # a scan lists the directory: no sidecar yet
    clock.now += 2
    (job,) = store.claim(1)
    store.finish_many(skipped=[job.id])  # the writer finishes the job (sidecar, then journal)
    stale = NewWork(job.path, Path("/r"), job.fingerprint, seen_at=looked)
    assert store.enqueue_many([stale]) == 0
    clock.now += 5  # a later look that finds the sidecar gone is believed
    fresh = NewWork(job.path, Path("/r"), job.fingerprint, seen_at=clock.now)
    assert store.enqueue_many([fresh]) == 1


def test_journal_survives_reopen_and_passes_integrity_check(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work(f"f{i}") for i in range(100)])
    store.mark_running([j.id for j in store.claim(10)])
    store.close()
    again = _store(tmp_path)
    assert again.counts() == {"pending": 90, "running": 10, "done": 0, "failed": 0}
    assert again.recover() == 10
    assert again.integrity_check() == "ok"


def test_sidecar_claims_bind_one_name_to_one_image_and_go_with_it(tmp_path: Path) -> None:
    store = Journal(tmp_path / "j.db")
    d = tmp_path / "photos"
    store.claim_sidecars([(d / "photo.png", "photo")])
    assert store.claims_in(d) == {"photo.png": "photo"}
    store.claim_sidecars([(d / "photo.jpg", "photo.jpg"), (d / "other.jpg", "other")])
    assert store.claims_near(d / "photo.gif") == {"photo.png": "photo", "photo.jpg": "photo.jpg"}
    assert store.claims_in(tmp_path) == {}
    store.forget(d / "photo.png")  # the image is gone: its name is free again
    assert store.claims_in(d) == {"photo.jpg": "photo.jpg", "other.jpg": "other"}
    # One name, one image: a claim on a taken base or for a claimed image replaces the old one
    # (callers claim only names that the claims they read left free).
    store.claim_sidecars([(d / "new.jpg", "other"), (d / "photo.jpg", "photo")])
    assert store.claims_in(d) == {"photo.jpg": "photo", "new.jpg": "other"}


def test_a_version_1_journal_gains_the_claims_table(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "j.db"
    store = Journal(path)
    store.enqueue_many([NewWork(tmp_path / "a.jpg", tmp_path, Fingerprint(1, 5, 9))])
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE sidecars")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Journal(path)
    assert store.get(tmp_path / "a.jpg") is not None
    store.claim_sidecars([(tmp_path / "a.jpg", "a")])
    assert store.claims_in(tmp_path) == {"a.jpg": "a"}


def test_a_version_2_journal_gains_the_provenance_columns_and_keeps_its_jobs(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "j.db"
    db = sqlite3.connect(path)  # schema 2 as phicapd 2 wrote it: no backend, no endpoint
    db.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, root TEXT NOT NULL,"
        " state TEXT NOT NULL, force INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at REAL NOT NULL DEFAULT 0, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT,"
        " model TEXT, prompt TEXT, sidecar TEXT, error_code TEXT, error_message TEXT, created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL);"
        f"INSERT INTO jobs (path, root, state, model, size, mtime_ns, inode, created_at, updated_at)"
        f" VALUES ('{tmp_path / 'old.jpg'}', '{tmp_path}', 'done', 'm@main', 1, 2, 3, 0, 0);"
        "PRAGMA user_version=2;"
    )
    db.close()
    store = Journal(path)
    old = store.get(tmp_path / "old.jpg")
    assert old is not None and old.model == "m@main" and old.backend is None and old.endpoint is None
    store.enqueue_many([NewWork(tmp_path / "new.jpg", tmp_path, Fingerprint(1, 5, 9))])
    [job] = store.claim(1)
    assert job.fingerprint is not None
    store.finish_many(
        [Success(job.id, "sha", "phi35v", "p", "/r/new.txt", job.fingerprint, "openai", "http://gpu1:8000/v1")]
    )
    done = store.get(tmp_path / "new.jpg")
    assert done is not None and (done.backend, done.endpoint, done.model) == ("openai", "http://gpu1:8000/v1", "phi35v")
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match=f"has schema {SCHEMA_VERSION + 1}, this phicapd knows {SCHEMA_VERSION}"):
        Journal(path)


def test_a_version_3_journal_gains_caption_settings_key_and_staged(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "j.db"
    store = Journal(path)
    store.enqueue_many([_work("a")])
    store.close()
    db = sqlite3.connect(path)  # back to schema 3: the columns 4 added are gone
    for column in ("caption", "settings_key", "staged"):
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    store = Journal(path)
    [job] = store.claim(1)
    assert (job.caption, job.settings_key, job.staged) == (None, None, False)
    assert job.fingerprint is not None
    store.stage_many([Success(job.id, "sha", "m@r", "p", "", job.fingerprint, caption="c", settings_key="k")])
    staged = store.get(job.path)
    assert staged is not None and (staged.caption, staged.settings_key, staged.staged) == ("c", "k", True)
    store.finish_many([Success(job.id, "sha", "m@r", "p", "/x.txt", job.fingerprint, caption="c", settings_key="k")])
    done = store.get(job.path)
    assert done is not None and done.staged is False and done.state.value == "done"
    assert [j.path for j in store.captioned(job.root)] == [job.path]
    store.close()


def test_recover_returns_a_staged_job_at_once_without_counting_an_attempt(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work("a"), _work("b")])
    a, b = store.claim(2)
    store.mark_running([a.id, b.id])
    assert a.fingerprint is not None
    store.stage_many([Success(a.id, "sha", "m", "p", "", a.fingerprint, caption="c", settings_key="k")])
    assert store.recover() == 1  # b: interrupted on the model
    ra, rb = store.get(a.path), store.get(b.path)
    assert ra is not None and rb is not None
    assert (ra.state.value, ra.attempts, ra.error_code) == ("pending", 0, None)
    assert (rb.attempts, rb.error_code) == (1, "interrupted")
    assert [j.id for j in store.claim(10)] == [a.id]  # b backs off; a is runnable now


def test_failure_counts_by_state_and_code_match_what_failures_lists(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work(n) for n in "abcde"])
    a, b, c, _d, e = store.claim(10)
    store.finish_many(
        [Success(e.id, "sha", "m", "p", "/r/e.txt", e.fingerprint)],  # type: ignore[arg-type]
        [
            Failure(a.id, "caption_empty", "a: blank", retryable=True),  # waits to be retried
            Failure(b.id, "caption_empty", "b: blank", retryable=False),
            Failure(c.id, "image_corrupt", "c: broken", retryable=False),
        ],
    )
    assert store.failure_counts() == [
        ("failed", "caption_empty", 1),
        ("failed", "image_corrupt", 1),
        ("pending", "caption_empty", 1),
    ]
    assert sum(n for _, _, n in store.failure_counts()) == len(store.failures())


def test_a_backfill_keeps_its_caption_and_is_returned_at_once_after_a_crash(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work("a"), _work("b")])
    a, b = store.claim(2)
    assert a.fingerprint is not None and b.fingerprint is not None
    store.finish_many(
        [
            Success(a.id, "sha", "m", "p", "/r/a.txt", a.fingerprint, caption="c", settings_key="k", formats=("txt",)),
            Success(b.id, "sha", "m", "p", "/r/b.txt", b.fingerprint),  # no caption kept: nothing to copy
        ]
    )
    # The scan found outputs missing: a backfill for a, the model for b (and for a changed image).
    backfills = [NewWork(j.path, j.root, j.fingerprint, backfill=True) for j in (a, b)]  # type: ignore[arg-type]
    assert store.enqueue_many(backfills) == 2
    ra, rb = store.get(a.path), store.get(b.path)
    assert ra is not None and (ra.backfill, ra.staged, ra.caption, ra.formats) == (True, True, "c", frozenset({"txt"}))
    assert rb is not None and (rb.backfill, rb.staged) == (False, False)
    # The image changes while the backfill waits: it goes to the model instead.
    store.enqueue_many([NewWork(a.path, a.root, Fingerprint(9, 9, 9))])
    changed = store.get(a.path)
    assert changed is not None and (changed.backfill, changed.staged) == (False, False)
    # A backfill on its way when the daemon dies is returned at once, no attempt counted.
    store.enqueue_many([NewWork(b.path, b.root, b.fingerprint, force=True)])  # type: ignore[arg-type]
    store.finish_many([Success(b.id, "sha", "m", "p", "/r/b.txt", b.fingerprint, caption="d", settings_key="k")])  # type: ignore[arg-type]
    store.enqueue_many([NewWork(b.path, b.root, b.fingerprint, backfill=True)])  # type: ignore[arg-type]
    store.mark_running([b.id])
    assert store.recover() == 0
    back = store.get(b.path)
    assert back is not None and (back.state.value, back.attempts, back.backfill) == ("pending", 0, True)


def test_a_job_decoding_when_the_daemon_died_counts_an_attempt_and_backs_off(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    store.enqueue_many([_work("hostile"), _work("beside"), _work("done"), _work("later")])
    hostile, beside, done, _later = store.claim(10)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.mark_decoding(done.id)
    store.mark_decoding(done.id, False)  # decoded, then captioned: its mark is cleared
    store.mark_decoding(hostile.id)
    store.mark_decoding(beside.id)
    assert statements == []  # no journal transaction, which would wait for the writer's fsync
    store.close()  # the process dies (what it wrote to the marks file stays)

    store = _store(tmp_path, clock)  # the next start
    assert store.recover() == 2
    for job in (store.get(hostile.path), store.get(beside.path)):
        assert (job.state, job.attempts, job.error_code) == (State.PENDING, 1, "interrupted_decoding")
        assert job.error_message == f"{job.path}: the daemon stopped while decoding this image"
    assert store.get(done.path).error_code is None and store.get(done.path).attempts == 0
    assert [j.path.name for j in store.claim(10)] == ["done", "later"]  # the suspects back off
    clock.now += 10
    assert [j.path.name for j in store.claim(10)] == ["hostile", "beside", "done", "later"]
    assert {f.path.name for f in store.failures()} == {"hostile", "beside"}
    store.close()
    assert _store(tmp_path, clock).recover() == 0  # counted once: a clean restart blames nobody


def test_only_a_pending_job_is_blamed_for_a_crash_in_the_decoder(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work(n) for n in "abcde"])
    a, b, c, d, e = store.claim(5)
    for job in (a, b, c, d, e):
        store.mark_decoding(job.id)  # and none is cleared, as if each clear had failed
    store.mark_running([a.id])  # the model took it: a crash now is the model's
    store.finish_many(failures=[Failure(b.id, "image_corrupt", "b: broken", retryable=False)])
    store.finish_many(failures=[Failure(c.id, "caption_failed", "c: boom", retryable=True)])
    store.finish_many(skipped=[d.id])
    assert store.recover() == 2
    assert (store.get(a.path).error_code, store.get(a.path).attempts) == ("interrupted", 1)
    assert (store.get(b.path).state, store.get(b.path).attempts) == (State.FAILED, 1)
    assert (store.get(c.path).error_code, store.get(c.path).attempts) == ("caption_failed", 1)
    assert store.get(d.path).state is State.DONE
    assert (store.get(e.path).error_code, store.get(e.path).attempts) == ("interrupted_decoding", 1)


def test_a_job_both_marked_and_running_counts_one_attempt_as_the_models(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.enqueue_many([_work("a")])
    (a,) = store.claim(1)
    store.mark_decoding(a.id)
    store._db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (a.id,))  # mark_running, minus its clear
    assert store.recover() == 1
    assert (store.get(a.path).error_code, store.get(a.path).attempts) == ("interrupted", 1)


def test_decode_marks_reuse_their_slots_and_ignore_a_torn_or_stale_file(tmp_path: Path) -> None:
    from phicapd.pipeline.decode_marks import DecodeMarks

    marks = DecodeMarks(tmp_path / "m")
    for job_id in (7, 8, 9):
        marks.set(job_id, True)
    marks.set(7, False)
    marks.set(10, True)  # takes 7's slot
    marks.set(10, True)  # marked twice: still one slot
    marks.set(11, False)  # never marked: nothing to clear
    assert marks.left() == [8, 9, 10]
    marks.close()
    with (tmp_path / "m").open("ab") as fh:
        fh.write(b"\x01\x02\x03")  # a torn write at the end is not a job id
    again = DecodeMarks(tmp_path / "m")
    assert again.left() == [8, 9, 10]
    for job_id in range(100, 1200):  # more than a page of slots: the file grows
        again.set(job_id, True)
    assert again.left() == [8, 9, 10, *range(100, 1200)]  # the crash's marks are kept until reset
    again.reset()
    assert again.left() == []
    again.close()
    size = (tmp_path / "m").stat().st_size
    for _ in range(3):  # restarts without a crash do not grow it
        restart = DecodeMarks(tmp_path / "m")
        restart.set(5, True)
        restart.close()
        restart = DecodeMarks(tmp_path / "m")
        assert restart.left() == [5]
        restart.reset()
        restart.close()
    assert (tmp_path / "m").stat().st_size == size
    (tmp_path / "m").write_bytes((3).to_bytes(8, "little"))
    assert DecodeMarks(tmp_path / "m", fresh=True).left() == []

    # A journal made new beside the marks of an old one (deleted by hand) does not blame its jobs.
    (tmp_path / "j.sqlite3-decoding").write_bytes((1).to_bytes(8, "little") + (999).to_bytes(8, "little"))
    store = _store(tmp_path)
    store.enqueue_many([_work("a")])
    assert store.recover() == 0 and store.get(Path("/r/a")).attempts == 0
    store.close()
    (tmp_path / "j.sqlite3-decoding").write_bytes((999).to_bytes(8, "little"))  # no such job
    store = _store(tmp_path)
    assert store.recover() == 0
    assert store._marks.left() == []


def test_parking_a_job_whose_crashes_used_up_its_attempts_counts_no_more(tmp_path: Path) -> None:
    """``phicapctl failures`` showed attempts=4 with max_attempts = 3: the crash that
    ``recover`` counted and the parking of the job were two attempts for one try."""
    store = _store(tmp_path)
    store.enqueue_many([_work("hostile"), _work("model")])
    hostile, model = store.claim(10)
    for _ in range(3):  # three starts, each dying while decoding one and captioning the other
        store.mark_decoding(hostile.id)
        store.mark_running([model.id])
        store.close()
        store = _store(tmp_path)
        store.recover()
    store.mark_running([model.id])  # a fourth crash cannot count past the limit either
    store.close()
    store = _store(tmp_path)
    store.recover()
    assert sorted((j.path.name, j.attempts) for j in store.failures()) == [("hostile", 3), ("model", 3)]
    # The scheduler then parks both without trying them again (non-retryable).
    store.finish_many(failures=[Failure(j.id, "interrupted_decoding", "m", False) for j in (hostile, model)])
    assert {j.path.name: (j.state, j.attempts) for j in store.failures()} == {
        "hostile": (State.FAILED, 3),
        "model": (State.FAILED, 3),
    }


def test_names_that_are_not_utf8_round_trip_beside_rows_written_before(tmp_path: Path) -> None:
    import os
    import sqlite3

    store = _store(tmp_path)
    store.enqueue_many([_work("old.png")])  # a valid UTF-8 name is stored as it always was
    store.close()
    db = sqlite3.connect(tmp_path / "j.sqlite3")
    assert db.execute("SELECT path FROM jobs").fetchall() == [("/r/old.png",)]
    db.close()
    store = _store(tmp_path)
    odd_dir = Path("/r") / os.fsdecode(b"dir\xfe")
    bad = NewWork(odd_dir / os.fsdecode(b"bad\xffname.png"), Path("/r"), Fingerprint(1, 5, 9))
    newline = NewWork(odd_dir / "new\nline.png", Path("/r"), Fingerprint(1, 5, 9))
    assert store.enqueue_many([bad, newline, _work("old.png")]) == 2
    assert {j.path for j in store.claim(10)} == {bad.path, newline.path, Path("/r/old.png")}
    job = store.get(bad.path)
    assert job is not None and job.path == bad.path
    store.finish_many(
        [
            Success(
                job.id, "sha", "m", "p", os.fsdecode(b"bad\xffname.txt"), bad.fingerprint, caption="c", settings_key="k"
            )
        ],
        [Failure(store.get(newline.path).id, "x", f"{newline.path}: \udcff", retryable=False)],  # type: ignore[union-attr]
        claims=[(bad.path, os.fsdecode(b"bad\xffname"))],
    )
    assert [j.path for j in store.captioned(Path("/r"), odd_dir)] == [bad.path]
    assert store.get(bad.path).sidecar == os.fsdecode(b"bad\xffname.txt")  # type: ignore[union-attr]
    assert store.claims_in(odd_dir) == {os.fsdecode(b"bad\xffname.png"): os.fsdecode(b"bad\xffname")}
    assert store.claims_near(bad.path) == store.claims_in(odd_dir)
    assert store.failures()[0].error_message == "/r/dir\\xfe/new\nline.png: \\xff"  # for people
    assert store.retry([str(newline.path)]) == 1
    store.forget(bad.path)
    assert store.get(bad.path) is None and store.claims_in(odd_dir) == {}
