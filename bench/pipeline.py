"""Pipeline throughput without a model: watch -> journal -> decode -> sidecar, files per second.

    python bench/pipeline.py [--files 10000] [--dirs 10]

The captioner costs nothing, so the figures are the daemon's own overhead: inotify, settling,
SQLite with synchronous=FULL, decoding, atomic sidecar writes. Three workloads, all in one run:

* baseline: the original script's loop (decode, caption, plain write) over the files, serially;
* drop: the files written by another process into a running daemon's watched root, half in
  place and half renamed in, timed from the first write to the last sidecar;
* catch-up: a daemon started on a tree where half the images already have sidecars;
* backfill: the dropped tree again, its root now also writing ``json``: every ``photo.json``
  comes from the journal's caption, and the model must not be asked once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd.captioner import Caption, CaptionRequest, Deliver, Take
from phicapd.config import Settings, load_settings
from phicapd.log import configure_logging
from phicapd.service import Daemon


class FreeCaptioner:
    """Answers instantly, batch after batch: what remains is the pipeline's own cost."""

    identity = "bench@free"
    max_batch = 32
    continuous_batching = False
    kept_image_side = 2048
    waiting = None

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, image: Image.Image) -> None:
        return None

    def stream(self, take: Take, deliver: Deliver) -> None:
        while batch := take(self.max_batch, True):
            for request, caption in zip(batch, self.caption(batch), strict=True):
                deliver(request, caption)

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        self.calls += len(batch)
        return [Caption(f"{r.image.size[0]}x{r.image.size[1]}", 1) for r in batch]

    def warm_up(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def stopping(self) -> None:
        pass

    def close(self) -> None:
        pass


WRITER = """
import os, sys
from PIL import Image
root, n, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, f"set{i % dirs}")
    os.makedirs(d, exist_ok=True)
    img = Image.new("RGB", (8, 8), (i & 255, (i >> 8) & 255, (i >> 16) & 255))
    target = os.path.join(d, f"img{i:06d}.png")
    if i % 2:
        img.save(target + ".part", format="PNG"); os.replace(target + ".part", target)
    else:
        img.save(target, format="PNG")
"""


def make_tree(root: Path, n: int, dirs: int, with_sidecars_every: int = 0) -> None:
    old = time.time() - 3600
    for i in range(n):
        d = root / f"set{i % dirs}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:06d}.png"
        Image.new("RGB", (8, 8), (i & 255, (i >> 8) & 255, 3)).save(p, format="PNG")
        os.utime(p, (old, old))
        if with_sidecars_every and i % with_sidecars_every == 0:
            p.with_suffix(".txt").write_text("existing\n")


def settings_for(work: Path, root: Path, formats: str = '["txt"]') -> Settings:
    cfg = work / "bench.toml"
    cfg.write_text(
        "[watcher]\nsettle_seconds = 0.5\nrescan_interval_seconds = 0\n"
        "[model]\nmax_batch = 32\n[scheduler]\ndecode_workers = 2\nprefetch = 64\nbatch_window_ms = 2\n"
        f'[control]\nsocket = "{work / "ctl.sock"}"\n[state]\ndir = "{work / "state"}"\n'
        f'[log]\nformat = "json"\nlevel = "warning"\n[[watch]]\npath = "{root}"\nformats = {formats}\n'
    )
    return load_settings(cfg)


def count_sidecars(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.txt"))


def run_daemon(settings: Settings, captioner: FreeCaptioner | None = None) -> tuple[Daemon, threading.Thread]:
    captioner = captioner or FreeCaptioner()
    daemon = Daemon(settings, lambda _s: captioner)
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    while not daemon.is_ready():
        time.sleep(0.01)
    return daemon, t


def wait_done(daemon: Daemon, root: Path, expected: int, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = daemon.store.counts()
        if c["done"] + c["failed"] >= expected and c["pending"] == 0 and c["running"] == 0:
            return time.monotonic()
        time.sleep(0.1)
    raise SystemExit(f"timed out: {daemon.store.counts()}")


def bench_baseline(work: Path, n: int, dirs: int) -> float:
    root = work / "baseline"
    make_tree(root, n, dirs)
    captioner = FreeCaptioner()
    started = time.monotonic()
    for path in sorted(root.rglob("*.png")):
        image = Image.open(path)
        image.load()
        (caption,) = captioner.caption([CaptionRequest(image.convert("RGB"), "p", 1)])
        path.with_suffix(".txt").write_text(caption.text)
    return time.monotonic() - started


def bench_drop(work: Path, n: int, dirs: int) -> tuple[float, float]:
    root = work / "drop"
    root.mkdir()
    (work / "d").mkdir()
    daemon, thread = run_daemon(settings_for(work / "d", root))
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", WRITER, str(root), str(n), str(dirs)], check=True)
    written = time.monotonic() - started
    finished = wait_done(daemon, root, n)
    daemon.request_stop()
    thread.join(60)
    assert count_sidecars(root) == n, count_sidecars(root)
    return finished - started, written


def bench_catch_up(work: Path, n: int, dirs: int) -> tuple[float, float]:
    root = work / "catchup"
    make_tree(root, n, dirs, with_sidecars_every=2)
    (work / "c").mkdir()
    started = time.monotonic()
    daemon, thread = run_daemon(settings_for(work / "c", root))
    finished = wait_done(daemon, root, n // 2)
    scan = daemon.intake.last_scan
    daemon.request_stop()
    thread.join(60)
    assert count_sidecars(root) == n
    return finished - started, scan.seconds if scan else float("nan")


def bench_backfill(work: Path, n: int) -> float:
    """The dropped tree (captioned, ``txt``) with ``json`` added to its root's formats."""
    root = work / "drop"
    captioner = FreeCaptioner()
    started = time.monotonic()
    daemon, thread = run_daemon(settings_for(work / "d", root, '["txt", "json"]'), captioner)
    deadline = time.monotonic() + 900
    while sum(1 for _ in root.rglob("*.json")) < n or daemon.store.counts()["pending"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"backfill timed out: {daemon.store.counts()}")
        time.sleep(0.1)
    finished = time.monotonic()
    daemon.request_stop()
    thread.join(60)
    if captioner.calls:
        raise SystemExit(f"the backfill asked the model {captioner.calls} times")
    return finished - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=10)
    args = parser.parse_args()
    configure_logging("json", "warning")
    work = Path(tempfile.mkdtemp(prefix="phicapd-bench-"))
    try:
        n, dirs = args.files, args.dirs
        base = bench_baseline(work, n, dirs)
        drop, written = bench_drop(work, n, dirs)
        catch, scan = bench_catch_up(work, n, dirs)
        backfill = bench_backfill(work, n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("baseline: serial loop, plain writes", n, base, n / base),
        ("drop into watched root (inotify)", n, drop, n / drop),
        ("catch-up: half already captioned", n // 2, catch, (n // 2) / catch),
        ("backfill: json added, 0 model calls", n, backfill, n / backfill),
    ]
    print(f"\nphicapd pipeline benchmark: {n} files in {dirs} directories, zero-cost captioner, {os.cpu_count()} CPUs")
    print(f"{'workload':40} {'captions':>9} {'seconds':>8} {'files/s':>8} {'vs baseline':>11}")
    for name, count, seconds, rate in rows:
        print(f"{name:40} {count:9d} {seconds:8.2f} {rate:8.0f} {rate / rows[0][3]:10.2f}x")
    print(f"(drop: the writer took {written:.2f} s; catch-up: the reconcile scan of {n} files took {scan:.2f} s)")


if __name__ == "__main__":
    main()
