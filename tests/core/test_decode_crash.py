"""A file that crashes the image decoder (a segfault in Pillow's C code) costs a decode worker,
never the daemon: it is parked after ``max_attempts`` with ``image_crashed_decoder`` and the
service stays up, however many such files there are (two used to make six crashes of the daemon
in seven starts, over systemd's start limit). The images decoded beside it are captioned once.
A crash in the daemon's own process while an image is prepared (``interrupted_decoding``) is
still blamed on that image at the next start and decoded alone."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

from phicapd.pipeline.decode import fingerprint_of
from phicapd.pipeline.decode_pool import DecodeWorkers
from phicapd.pipeline.journal import Journal, NewWork
from tests.support.daemon import (
    is_settled,
    running_daemon,
    settings_for,
    socket_ready,
    spawn_fake_daemon,
    wait_for,
    write_config,
)
from tests.support.fakes import FakeCaptioner, write_unique_png

MAX_ATTEMPTS = 3  # the default


def _jobs(db: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return {Path(r["path"]).name: r for r in conn.execute("SELECT * FROM jobs")}


def _old(path: Path) -> None:
    settled = time.time() - 60  # the start-up scan queues it at once, not after a settle time
    os.utime(path, (settled, settled))


def test_files_that_crash_the_decoder_are_parked_and_the_daemon_never_exits(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    # Real PNGs: only the test switch makes their decode abort (in the worker). Their names sort
    # first and last, so they are decoded beside innocent images.
    write_unique_png(root / "a-hostile.png", 998)
    write_unique_png(root / "z-hostile.png", 999)
    keys = {write_unique_png(root / f"img{i:02d}.png", i) for i in range(20)}
    for path in root.iterdir():
        _old(path)
    config = write_config(tmp_path, [root])  # retries back off 0.2 s, doubling
    record, log, db = tmp_path / "calls.log", tmp_path / "daemon.log", tmp_path / "state" / "journal.sqlite3"
    env = {"FAKE_ABORT_ON_HOSTILE": "1", "PHICAPD_SCHEDULER__DECODE_WORKERS": "2"}
    hostile = {"a-hostile.png", "z-hostile.png"}

    def parked_and_done() -> bool:
        try:
            jobs = _jobs(db)
        except sqlite3.OperationalError:  # not made yet
            return False
        states = [j["state"] for name, j in jobs.items() if name not in hostile]
        return (
            all(jobs.get(n) is not None and jobs[n]["state"] == "failed" for n in hostile) and states == ["done"] * 20
        )

    proc = spawn_fake_daemon(config, record, log, env)
    try:
        wait_for(lambda: proc.poll() is not None or parked_and_done(), 60, "a crash or the end of the work")
        assert proc.poll() is None, log.read_text()[-3000:]  # the daemon never exited
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 30, "the daemon to be ready")
        from phicapd.control.client import ControlClient

        with ControlClient(tmp_path / "ctl.sock", timeout=10) as client:
            failures = client.failures()
        assert sorted((Path(f["path"]).name, f["code"], f["attempts"]) for f in failures) == [
            (name, "image_crashed_decoder", MAX_ATTEMPTS) for name in sorted(hostile)
        ]
        assert all("the image decoder killed by SIGABRT on this file" in f["message"] for f in failures)
        time.sleep(0.5)  # the parked files are not decoded again
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    calls: dict[str, int] = {}
    for key in record.read_text().split():
        calls[key] = calls.get(key, 0) + 1
    assert calls == dict.fromkeys(keys, 1)  # every innocent image captioned once, the hostile ones never
    jobs = _jobs(db)
    assert all(j["attempts"] <= MAX_ATTEMPTS for j in jobs.values())
    assert all(j["attempts"] == 0 for name, j in jobs.items() if name not in hostile)
    assert len(list(root.glob("img*.txt"))) == 20 and not list(root.glob("*hostile.txt"))
    assert "interrupted_decoding" not in log.read_text()  # no crash of the daemon to blame anyone for


def test_an_image_interrupted_while_decoding_is_decoded_alone(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(12):
        write_unique_png(root / f"b{i:02d}.png", i)
        _old(root / f"b{i:02d}.png")
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")
    settings.scheduler.decode_workers = 3
    # The last start died while b05 (and b06 beside it) were being decoded.
    store = Journal(settings.state.dir / "journal.sqlite3", backoff_seconds=0)
    store.enqueue_many(NewWork(p, root, fingerprint_of(p)) for p in sorted(root.glob("*.png")))  # type: ignore[arg-type]
    jobs = {j.path.name: j for j in store.claim(20)}
    store.mark_decoding(jobs["b05.png"].id)
    store.mark_decoding(jobs["b06.png"].id)
    assert store.recover() == 2
    store.close()

    lock = threading.Lock()
    active: list[str] = []
    seen: dict[str, tuple[list[str], int]] = {}  # a suspect: what else was decoding, what was on the model
    real = DecodeWorkers.decode_file

    def watched(self, path):  # type: ignore[no-untyped-def]
        with lock:
            active.append(Path(path).name)
        try:
            time.sleep(0.02)  # long enough for decodes to overlap if the gate let them
            if Path(path).name in ("b05.png", "b06.png"):
                with sqlite3.connect(settings.state.dir / "journal.sqlite3") as conn:
                    running = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
                with lock:
                    seen[Path(path).name] = ([n for n in active if n != Path(path).name], running)
            return real(self, path)
        finally:
            with lock:
                active.remove(Path(path).name)

    monkeypatch.setattr(DecodeWorkers, "decode_file", watched)
    fake = FakeCaptioner(max_batch=4, latency=0.02)
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] == 12 and is_settled(daemon), 30, "all 12")
    assert seen == {"b05.png": ([], 0), "b06.png": ([], 0)}
    assert len(fake.calls) == 12 and max(fake.calls.values()) == 1
