"""The daemon end to end with the fake model: drop files -> sidecars, exactly once.

These are the must-shows of the daemon core: a 10,000-file drop, a catch-up scan that skips
valid sidecars, writers that are slow or rename partial files in, an inotify overflow, and
``kill -9`` at random moments. Figures (files/s) are printed with ``-s``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from phicapd.pipeline.decode import fingerprint_of
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
from tests.support.fakes import FakeCaptioner, image_key, unique_image, write_unique_png


def _sidecars(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.txt") if not p.name.startswith("."))


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file()]


def test_ten_thousand_files_dropped_at_once_each_captioned_once(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    root.mkdir()
    fake = FakeCaptioner(max_batch=32)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 32\n", settle=0.5)
    n_dirs, per_dir = 10, 1000
    with running_daemon(settings, fake) as daemon:
        started = time.monotonic()
        keys = set()
        for d in range(n_dirs):
            sub = root / f"set{d}"
            sub.mkdir()
            for i in range(per_dir):
                index = d * per_dir + i
                keys.add(write_unique_png(sub / f"img{i:04d}.png", index, rename_in=index % 2 == 1))
        wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == n_dirs * per_dir, 300, "10,000 sidecars", 0.5)
        elapsed = time.monotonic() - started
        counts = daemon.store.counts()
    rate = n_dirs * per_dir / elapsed
    print(f"\n10,000 files dropped -> sidecars in {elapsed:.1f} s = {rate:.0f} files/s (zero-latency fake model)")
    assert len(fake.calls) == n_dirs * per_dir
    assert set(fake.calls) == keys
    assert max(fake.calls.values()) == 1
    assert counts["failed"] == 0 and counts["done"] == n_dirs * per_dir
    assert rate >= 100
    assert _temps(root) == []


def test_catch_up_scan_captions_only_images_without_valid_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    old = time.time() - 3600
    expected = set()
    for i in range(10_000):
        image = root / ("a" if i % 2 else "b") / f"p{i:05d}.png"
        unique_image(i).save(image)
        os.utime(image, (old, old))
        if i % 2 == 0:
            image.with_suffix(".txt").write_text("hand-written caption\n")
        else:
            expected.add(image_key(unique_image(i)))
    fake = FakeCaptioner(max_batch=32)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 32\n")
    started = time.monotonic()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == 10_000, 300, "catch-up to finish", 0.5)
        scan = daemon.intake.last_scan
    elapsed = time.monotonic() - started
    print(f"\ncatch-up of 10,000 files (5,000 captioned): {elapsed:.1f} s; scan alone {scan.seconds:.2f} s")
    assert set(fake.calls) == expected and sum(fake.calls.values()) == 5000
    assert (root / "b" / "p00000.txt").read_text() == "hand-written caption\n"


def test_slow_writer_partial_download_and_rsync_temp_give_one_caption_each(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], settle=1.0)
    big = Image.effect_noise((2600, 2600), 64).convert("RGB")
    with running_daemon(settings, fake) as daemon:
        # A 20 MB-class image written in chunks over ~3 s, closed and reopened in between.
        import io

        buf = io.BytesIO()
        big.save(buf, format="BMP")
        data = buf.getvalue()
        assert len(data) > 19_000_000
        target = root / "slow.bmp"
        chunk = len(data) // 6
        for start in range(0, len(data), chunk):
            with target.open("ab") as fh:
                fh.write(data[start : start + chunk])
            time.sleep(0.5)
        # A browser download: x.jpg.part renamed to x.jpg when complete.
        part = root / "download.jpg.part"
        unique_image(1, (64, 64)).save(part, format="JPEG")
        os.rename(part, root / "download.jpg")
        # rsync: .name.XXXXXX renamed over the final name.
        temp = root / ".synced.png.Ab12Cd"
        unique_image(2, (64, 64)).save(temp, format="PNG")
        os.rename(temp, root / "synced.png")
        wait_for(lambda: len(_sidecars(root)) == 3 and is_settled(daemon), 60, "three sidecars")
    assert sum(fake.calls.values()) == 3
    assert image_key(big) in fake.calls  # the complete image, not a prefix of it
    assert sorted(p.name for p in _sidecars(root)) == ["download.txt", "slow.txt", "synced.txt"]


def test_inotify_overflow_triggers_reconcile_and_still_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        for i in range(50):
            write_unique_png(root / f"a{i}.png", i)
        wait_for(lambda: len(_sidecars(root)) == 50 and is_settled(daemon), 60, "first 50")
        scans = daemon.intake.scans_done
        # Files whose events are lost, as in a kernel queue overflow ...
        seen = daemon.intake.file_ready
        daemon.intake.file_ready = lambda path, r: None  # type: ignore[method-assign]
        for i in range(50, 80):
            write_unique_png(root / f"a{i}.png", i)
        wait_for(lambda: daemon.watcher.pending() == 0, 10, "the lost events to pass")
        daemon.intake.file_ready = seen  # type: ignore[method-assign]
        assert len(_sidecars(root)) == 50
        # ... and the overflow record watchdog logs when the kernel queue overflows.
        logging.getLogger("watchdog.observers.inotify_c").warning("inotify event queue overflowed")
        wait_for(lambda: daemon.intake.scans_done > scans, 30, "the reconcile scan")
        wait_for(lambda: len(_sidecars(root)) == 80 and is_settled(daemon), 60, "all 80")
    assert len(fake.calls) == 80 and max(fake.calls.values()) == 1


def test_bad_files_are_recorded_and_never_block_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        # A file that stays empty may be a browser's placeholder: the watcher waits the
        # stalled-write time (60 s; 1 s here) for content, then hands it on to be recorded.
        assert daemon.watcher is not None
        daemon.watcher._table.stalled_write_seconds = 1.0
        (root / "empty.jpg").write_bytes(b"")
        os.utime(root / "empty.jpg", (time.time() - 3600,) * 2)  # old, as it is after those 60 s
        (root / "text.png").write_text("these are notes, not an image at all\n" * 10)
        for i in range(10):
            write_unique_png(root / f"ok{i}.png", i)
        wait_for(lambda: len(_sidecars(root)) == 10, 30, "the good images")
        wait_for(lambda: daemon.store.counts()["failed"] == 2, 60, "the bad images to be parked")
        failures = {Path(f["path"]).name: f for f in daemon.api.failures(10)}
        status = daemon.api.status()
    assert failures["text.png"]["code"] == "image_format_unsupported"
    assert "text.png" in failures["text.png"]["message"]
    assert failures["empty.jpg"]["code"] == "image_empty"
    assert status["journal"]["failed"] == 2


@pytest.mark.slow
def test_kill_dash_nine_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    record = tmp_path / "calls.log"
    config = write_config(tmp_path, [root], extra="[model]\nmax_batch = 8\n", settle=0.2)
    rng = random.Random(1234)
    keys = {write_unique_png(root / f"f{i:04d}.png", i) for i in range(1000)}
    # ~10 s of model time, so every kill lands mid-backlog. Interrupted jobs back off as in
    # production (seconds, not the other tests' 0.2 s), so the next kill finds other jobs on the model.
    env = {"FAKE_LATENCY": "0.08", "PHICAPD_SCHEDULER__RETRY_BACKOFF_SECONDS": "3"}
    captioned_before_each_kill: list[int] = []
    for _ in range(5):
        proc = spawn_fake_daemon(config, record, tmp_path / "daemon.log", env)
        time.sleep(rng.uniform(0.6, 1.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        captioned_before_each_kill.append(len(_sidecars(root)))
    proc = spawn_fake_daemon(config, record, tmp_path / "daemon.log", env)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 60, "the last daemon to be ready")
        wait_for(lambda: len(_sidecars(root)) == 1000, 180, "1,000 sidecars after the crashes")
        db = tmp_path / "state" / "journal.sqlite3"

        def drained() -> bool:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('pending','running')").fetchone()[0] == 0

        wait_for(drained, 60, "the journal to drain")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    calls: dict[str, int] = {}
    for line in record.read_text().split():
        calls[line] = calls.get(line, 0) + 1
    assert set(calls) == keys
    assert max(calls.values()) <= 2
    for sidecar in _sidecars(root):
        assert sidecar.read_text().startswith("A 8x8 test image ")
    assert _temps(root) == []
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0] == 1000
    duplicates = sum(1 for n in calls.values() if n > 1)
    print(
        f"\nkill -9 x5 during 1,000 files (sidecars at each kill: {captioned_before_each_kill}): "
        f"{duplicates} images captioned twice, none more"
    )
    assert captioned_before_each_kill[-1] < 1000, "the kills should land while work remains"


def test_an_image_deleted_before_its_turn_is_forgotten_not_failed(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        for i in range(5):
            write_unique_png(root / f"p{i}.png", i)
        wait_for(lambda: daemon.store.counts()["pending"] == 5, 30, "five queued jobs")
        (root / "p3.png").unlink()
        daemon.api.resume()
        wait_for(lambda: len(_sidecars(root)) == 4 and is_settled(daemon), 30, "the other four")
        counts = daemon.store.counts()
    assert counts == {"pending": 0, "running": 0, "done": 4, "failed": 0}


def test_an_image_interrupted_three_times_is_parked_unless_its_sidecar_made_it(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root])
    names = ["written.png", "poison.png", "once.png"]
    for i, name in enumerate(names):
        write_unique_png(root / name, i)
    # Three crashes while each was on the model, as the journal of the crashed daemons left it.
    store = Journal(settings.state.dir / "journal.sqlite3", max_attempts=3, backoff_seconds=0)
    fingerprints = {name: fingerprint_of(root / name) for name in names}
    store.enqueue_many([NewWork(root / n, root, f) for n, f in fingerprints.items() if f is not None])
    for crashes in range(3):
        jobs = store.claim(3) if crashes < 2 else [j for j in store.claim(3) if j.path.name != "once.png"]
        store.mark_running([j.id for j in jobs])
        store.recover()
    store.close()
    # The last crash came after written.png's sidecar was on disk and before the journal said so.
    (root / "written.txt").write_text("A caption from before the crash.")
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the recovered jobs")
        states = {n: daemon.store.get(root / n) for n in names}
    assert states["written.png"].state.value == "done"
    assert (root / "written.txt").read_text() == "A caption from before the crash."
    assert states["poison.png"].state.value == "failed" and states["poison.png"].error_code == "interrupted"
    assert not (root / "poison.txt").exists()
    assert states["once.png"].state.value == "done" and (root / "once.txt").exists()  # two crashes: tried again
    assert sum(fake.calls.values()) == 1


def test_a_sidecar_written_while_the_job_waited_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        daemon.scheduler.pause()  # a long backlog ahead of them
        keys = {name: write_unique_png(root / f"{name}.png", i) for i, name in enumerate(["hand", "queued"])}
        wait_for(lambda: daemon.store.counts()["pending"] == 2, 30, "both images to be queued")
        # While the job waits, its caption arrives another way (phicapctl caption-file, by hand).
        (root / "hand.txt").write_text("Written by hand.\n")
        daemon.scheduler.resume()
        wait_for(lambda: is_settled(daemon), 30, "the queue to drain")
        states = {n: daemon.store.get(root / f"{n}.png").state.value for n in keys}
    assert (root / "hand.txt").read_text() == "Written by hand.\n"
    assert fake.calls[keys["hand"]] == 0 and fake.calls[keys["queued"]] == 1
    assert states == {"hand": "done", "queued": "done"}


def test_a_failing_journal_is_retried_and_captions_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("phicapd.pipeline.writer.RETRY_SECONDS", (0.05, 0.2))
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner(max_batch=4)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")
    with running_daemon(settings, fake) as daemon:
        finish_many = daemon.store.finish_many
        failed: list[int] = []

        def flaky(successes=(), failures=(), skipped=(), claims=()):
            if len(failed) < 5 and (successes or skipped):
                failed.append(len(successes) + len(skipped))
                raise sqlite3.OperationalError("disk I/O error")
            return finish_many(successes, failures, skipped, claims)

        daemon.store.finish_many = flaky
        daemon.scheduler.pause()
        keys = [write_unique_png(root / f"b{i:02d}.png", i) for i in range(12)]
        wait_for(lambda: daemon.store.counts()["pending"] == 12, 30, "the images to be queued")
        # One gets a caption by hand while it waits: its "skipped" record fails too.
        (root / "b00.txt").write_text("By hand.\n")
        daemon.scheduler.resume()
        wait_for(lambda: daemon.store.counts()["done"] == 12 and is_settled(daemon), 30, "every image")
        states = {daemon.store.get(root / f"b{i:02d}.png").state.value for i in range(12)}
    assert len(failed) == 5, "the journal write should have failed five times"
    assert states == {"done"}  # none parked as corrupt or failed
    assert (root / "b00.txt").read_text() == "By hand.\n"
    assert fake.calls[keys[0]] == 0 and all(fake.calls[k] == 1 for k in keys[1:])  # nothing twice


@pytest.mark.parametrize("policy", ["skip", "only-missing"])
def test_a_sidecar_written_while_the_image_is_on_the_model_is_kept(tmp_path: Path, policy: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner(latency=1.0)
    settings = settings_for(tmp_path, [root], extra=f'[sidecar]\nexisting = "{policy}"\n')
    with running_daemon(settings, fake) as daemon:
        key = write_unique_png(root / "photo.png", 1)
        wait_for(lambda: daemon.scheduler.busy_since is not None, 30, "the image on the model")
        (root / "photo.txt").write_text("Written by hand meanwhile.\n")
        wait_for(lambda: daemon.store.counts()["done"] == 1 and is_settled(daemon), 30, "the job to finish")
    assert fake.calls[key] == 1
    assert (root / "photo.txt").read_text() == "Written by hand meanwhile.\n"
