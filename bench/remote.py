"""The remote backend's scaling, through the whole daemon, and its footprint beside the native one.

    python bench/remote.py [--per-endpoint 200] [--latency 0.2] [--limit 8] [--endpoints 1 2 4 8]

1. Throughput: for 1, 2, 4 and 8 simulated endpoints (``tests/support/openai_server.py``, each
   a process that answers after a fixed ``--latency`` and refuses more than ``--limit`` requests
   at once with a 429, as a saturated server would), a daemon with ``[model] backend = "openai"``
   and ``max_in_flight = --limit`` starts on a tree of small images without sidecars (the
   catch-up scan) and is timed from READY to the last sidecar in the journal. Files per
   endpoint are fixed, so every run lasts about as long. The ideal is endpoints x limit /
   latency files/s; the table gives each run's ratio to the 1-endpoint run and to linear.
2. Footprint: ``phicapd run`` as a process, remote (one endpoint) and native (the tiny random
   checkpoint on the CPU: the same imports and code, a model of megabytes), timed from exec to a
   healthy socket, then its RSS.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from phicapd.config import load_settings  # noqa: E402
from phicapd.log import configure_logging  # noqa: E402
from phicapd.service import Daemon, load_model_captioner  # noqa: E402
from tests.support.daemon import socket_ready, wait_for  # noqa: E402
from tests.support.openai_server import spawn  # noqa: E402


def _images(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (64, 48), (i & 255, (i >> 8) & 255, 90))
        img.putpixel((0, 0), ((i >> 16) & 255, 1, 2))
        img.save(root / f"img{i:06d}.png", format="PNG")


def _config(tmp: Path, root: Path | None, backend: str, extra: str) -> Path:
    lines = [
        "[watcher]",
        "settle_seconds = 0.2",
        "rescan_interval_seconds = 0",
        "[scheduler]",
        "batch_window_ms = 5",
        "[control]",
        f'socket = "{tmp / "ctl.sock"}"',
        "[state]",
        f'dir = "{tmp / "state"}"',
        "[log]",
        'format = "json"',
        'level = "warning"',
        "[model]",
        f'backend = "{backend}"',
    ]
    cfg = tmp / "phicapd.toml"
    watch = f'[[watch]]\npath = "{root}"\n' if root is not None else ""
    cfg.write_text("\n".join(lines) + "\n" + extra + watch)
    return cfg


def throughput(endpoints: int, per_endpoint: int, latency: float, limit: int) -> float:
    servers = [spawn("--port", "0", "--latency", str(latency), "--limit", str(limit)) for _ in range(endpoints)]
    tmp = Path(tempfile.mkdtemp(prefix="phicapd-bench-remote-"))
    files = per_endpoint * endpoints
    try:
        root = tmp / "photos"
        _images(root, files)
        urls = ", ".join(f'"{url}"' for _, url in servers)
        extra = (
            f"[remote]\nendpoints = [{urls}]\ninitial_in_flight = {limit}\nmax_in_flight = {limit}\n"
            "probe_interval_seconds = 1\n"
        )
        settings = load_settings(_config(tmp, root, "openai", extra))
        configure_logging(settings.log.format, settings.log.level)
        daemon = Daemon(settings, load_model_captioner)
        thread = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
        thread.start()
        wait_for(daemon.is_ready, 60, "ready")
        started = time.monotonic()
        wait_for(lambda: daemon.store.counts()["done"] == files, 600, f"{files} captions", 0.02)
        elapsed = time.monotonic() - started
        failed = daemon.store.counts()["failed"]
        daemon.request_stop()
        thread.join(60)
        if failed:
            raise SystemExit(f"{failed} images failed")
        return files / elapsed
    finally:
        for process, _ in servers:
            process.kill()
            process.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def footprint(backend: str, extra: str) -> tuple[float, float]:
    """(seconds from exec to a healthy socket, RSS in MiB) of ``phicapd run``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"phicapd-bench-{backend}-"))
    try:
        cfg = _config(tmp, None, backend, extra)
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "phicapd", "run", "--config", str(cfg)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: socket_ready(tmp / "ctl.sock"), 300, f"the {backend} daemon", 0.02)
            elapsed = time.monotonic() - started
            rss = _rss_mib(process.pid)
        finally:
            process.terminate()
            process.wait(60)
        return elapsed, rss
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-endpoint", type=int, default=200, help="images per endpoint in each run")
    p.add_argument("--latency", type=float, default=0.2, help="each request's fixed latency (s)")
    p.add_argument("--limit", type=int, default=8, help="requests in flight per endpoint")
    p.add_argument("--endpoints", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-footprint", action="store_true")
    args = p.parse_args()

    print(f"{os.cpu_count()} CPUs; {args.latency * 1000:.0f} ms per request, {args.limit} in flight per endpoint")
    print()
    print("| endpoints | files | files/s | vs 1 endpoint | of linear | of ideal |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for n in args.endpoints:
        rate = throughput(n, args.per_endpoint, args.latency, args.limit)
        base = base or rate / args.endpoints[0]
        ideal = n * args.limit / args.latency
        ratio = rate / base
        print(
            f"| {n} | {n * args.per_endpoint} | {rate:.1f} | {ratio:.2f}x | {ratio / n:.2f} | {rate / ideal:.2f} |",
            flush=True,
        )
    if args.no_footprint:
        return

    print()
    server, url = spawn("--port", "0")
    try:
        remote = footprint("openai", f'[remote]\nendpoints = ["{url}"]\n')
    finally:
        server.kill()
        server.wait()
    from phicapd.model.testmodel import make_test_model

    checkpoint = Path(tempfile.mkdtemp(prefix="phicapd-bench-tiny-"))
    try:
        make_test_model(checkpoint / "tiny")
        native = footprint("native", f'path = "{checkpoint / "tiny"}"\ndevice = "cpu"\ncompile = false\n')
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    print("| daemon | start to healthy socket | RSS |")
    print("| --- | ---: | ---: |")
    print(f"| remote (openai, 1 endpoint) | {remote[0]:.2f} s | {remote[1]:.0f} MiB |")
    print(f"| native (tiny checkpoint, CPU) | {native[0]:.2f} s | {native[1]:.0f} MiB |")


if __name__ == "__main__":
    main()
