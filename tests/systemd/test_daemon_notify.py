"""The real daemon on the tiny checkpoint, supervised the way systemd does it: NOTIFY_SOCKET,
WATCHDOG_USEC, SIGTERM to stop, SIGABRT when the pings stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.conftest import NotifyReceiver

REPO = Path(__file__).resolve().parents[2]
WATCHDOG_USEC = 400_000  # pings every 0.2 s
START_TIMEOUT = 180.0

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: the control socket's path must fit in sockaddr_un.
    directory = Path(tempfile.mkdtemp(prefix="sdd-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _config(workdir: Path, checkpoint: Path) -> Path:
    root = workdir / "photos"
    root.mkdir()
    config = workdir / "phicapd.toml"
    config.write_text(
        f"""
[model]
path = "{checkpoint}"
device = "cpu"
dtype = "float32"
compile = false
num_crops = 1
max_new_tokens = 4
[watcher]
settle_seconds = 0.2
[control]
socket = "{workdir / "ctl.sock"}"
[state]
dir = "{workdir / "state"}"
[log]
format = "json"
[[watch]]
path = "{root}"
"""
    )
    return config


def _spawn(argv: list[str], receiver: NotifyReceiver, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": receiver.address,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    env.pop("WATCHDOG_PID", None)
    with (workdir / "daemon.log").open("wb") as log:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir: Path) -> str:
    return (workdir / "daemon.log").read_text(errors="replace")[-4000:]


def _index(messages: list[dict[str, str]], key: str) -> int:
    return next(i for i, m in enumerate(messages) if key in m)


def _copy_photo(test_images_dir: Path, target: Path) -> None:
    shutil.copyfile(test_images_dir / "rocket.jpg", target.with_suffix(".part"))
    os.replace(target.with_suffix(".part"), target)


def test_status_ready_watchdog_stopping_sequence(
    path_notify_socket: NotifyReceiver, workdir: Path, tiny_checkpoint: Path, test_images_dir: Path
) -> None:
    config = _config(workdir, tiny_checkpoint)
    _copy_photo(test_images_dir, workdir / "photos" / "before.jpg")  # for the catch-up scan
    daemon = _spawn(["-m", "phicapd.cli.daemon", "run", "--config", str(config)], path_notify_socket, workdir)
    try:
        path_notify_socket.wait_for(lambda m: m.get("READY") == "1", START_TIMEOUT, "READY=1")
        sidecar = workdir / "photos" / "before.txt"
        deadline = time.monotonic() + 60
        while not sidecar.exists() and time.monotonic() < deadline:
            path_notify_socket.drain(0.1)
        assert sidecar.exists(), _log(workdir)
        path_notify_socket.drain(1.0)
        daemon.send_signal(signal.SIGTERM)
        path_notify_socket.wait_for(lambda m: m.get("STOPPING") == "1", 60, "STOPPING=1")
        assert daemon.wait(60) == 0, _log(workdir)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    path_notify_socket.drain(0.2)

    messages = path_notify_socket.messages
    ready, stopping = _index(messages, "READY"), _index(messages, "STOPPING")
    before = messages[:ready]
    assert any(m.get("STATUS", "").startswith("loading model") for m in before), before
    assert any("EXTEND_TIMEOUT_USEC" in m for m in before), "the start timeout is extended while loading"
    assert not any("WATCHDOG" in m for m in before), "no pings before the model is warm"
    pings = [i for i, m in enumerate(messages) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 5, messages
    assert ready < pings[0] and pings[-1] < stopping
    figures = [m["STATUS"] for m in messages[ready:stopping] if "STATUS" in m]
    assert any(re.search(r"\b1 done\b", s) for s in figures), f"STATUS carries the queue figures: {figures}"


def test_a_hung_model_call_stops_the_pings(
    path_notify_socket: NotifyReceiver, workdir: Path, tiny_checkpoint: Path, test_images_dir: Path
) -> None:
    config = _config(workdir, tiny_checkpoint)
    trigger = workdir / "hang"
    argv = ["-m", "tests.systemd.stuck_daemon", str(config), str(trigger), "1.0"]
    daemon = _spawn(argv, path_notify_socket, workdir)
    try:
        path_notify_socket.wait_for(lambda m: m.get("READY") == "1", START_TIMEOUT, "READY=1")
        path_notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", 10, "a first ping")
        trigger.touch()
        _copy_photo(test_images_dir, workdir / "photos" / "stuck.jpg")

        # Wait for 1.5 s (7 ping periods) without a ping while STATUS keeps coming.
        last_ping, silent_status = time.monotonic(), 0
        deadline = last_ping + 30
        while time.monotonic() - last_ping < 1.5:
            assert time.monotonic() < deadline, f"pings never stopped: {_log(workdir)}"
            for message in path_notify_socket.drain(0.1):
                if message.get("WATCHDOG") == "1":
                    last_ping, silent_status = time.monotonic(), 0
                elif "STATUS" in message:
                    silent_status += 1
        assert silent_status >= 3, "the daemon is alive and reporting, only the pings are withheld"
        assert daemon.poll() is None
        assert not (workdir / "photos" / "stuck.txt").exists()

        # What systemd does when WatchdogSec= passes without a ping.
        daemon.send_signal(signal.SIGABRT)
        assert daemon.wait(30) == -signal.SIGABRT
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
