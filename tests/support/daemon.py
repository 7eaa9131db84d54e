"""Run the real daemon in-process (fake model) or as a subprocess, and wait on its state."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phicapd.config import Settings, load_settings
from phicapd.log import configure_logging
from phicapd.service import Daemon
from tests.support.fakes import FakeCaptioner

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, roots: list[Path], extra: str = "", settle: float = 0.3) -> Path:
    state = tmp / "state"
    lines = [
        "[watcher]",
        f"settle_seconds = {settle}",
        "rescan_interval_seconds = 0",
        "[scheduler]",
        "batch_window_ms = 5",
        "retry_backoff_seconds = 0.2",
        "[control]",
        f'socket = "{tmp / "ctl.sock"}"',
        "[state]",
        f'dir = "{state}"',
        "[log]",
        'format = "json"',
        'level = "warning"',
    ]
    for root in roots:
        lines += ["[[watch]]", f'path = "{root}"']
    cfg = tmp / "phicapd.toml"
    cfg.write_text("\n".join(lines) + "\n" + extra)
    return cfg


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def is_settled(daemon: Daemon) -> bool:
    """Nothing left anywhere: watcher, intake, journal, lanes."""
    counts = daemon.store.counts()
    lanes = daemon.scheduler.lanes() if daemon.scheduler else {"x": 1}
    return (
        daemon.watcher is not None
        and daemon.watcher.pending() == 0
        and daemon.intake.idle()
        and counts["pending"] == 0
        and counts["running"] == 0
        and not any(lanes.values())
    )


@contextmanager
def running_daemon(
    settings: Settings,
    captioner: Any | None = None,
    *,
    rc: int = 0,
    factory: Callable[[Settings], Any] | None = None,
    settings_loader: Callable[[], Settings] | None = None,
) -> Iterator[Daemon]:
    """The daemon in a thread until the block ends; then it must have stopped with ``rc``."""
    captioner = captioner or FakeCaptioner()
    configure_logging(settings.log.format, settings.log.level)
    daemon = Daemon(settings, factory or (lambda _s: captioner), settings_loader)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["rc"] = daemon.run(install_signals=False)
        except BaseException as e:  # surfaced by the test below
            result["error"] = e

    thread = threading.Thread(target=target, name="test-daemon", daemon=True)
    thread.start()
    wait_for(lambda: daemon.is_ready() or "error" in result, 30, "the daemon to be ready")
    if "error" in result:
        raise result["error"]
    try:
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(60)
        assert not thread.is_alive(), "daemon did not stop"
        _drop_log_handler()
        if "error" in result:
            raise result["error"]
        assert result.get("rc") == rc


def _drop_log_handler() -> None:
    # configure_logging bound a handler to this test's captured stderr; a later test must not
    # write into that closed capture.
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_phicapd", False)]:
        root.removeHandler(handler)


def settings_for(tmp: Path, roots: list[Path], extra: str = "", settle: float = 0.3) -> Settings:
    return load_settings(write_config(tmp, roots, extra, settle))


def spawn_fake_daemon(
    config: Path, record: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The real daemon process with the fake model (see tests/support/fake_daemon.py); logs go to ``log``."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_RECORD": str(record), **(env or {})}
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_daemon", str(config)],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


def socket_ready(socket_path: Path) -> bool:
    """True once a daemon answers on ``socket_path`` with its model warm."""
    from phicapd.control.client import ControlClient, ControlClientError

    try:
        return ControlClient(socket_path, timeout=2).health()
    except ControlClientError:
        return False
