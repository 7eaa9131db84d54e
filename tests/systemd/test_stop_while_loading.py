"""systemctl stop while the model loads: the daemon stops at once instead of finishing a
download or a compile of minutes (systemd would SIGKILL it after TimeoutStopSec)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from phicapd.service import _ExtendTimeout
from tests.support.daemon import spawn_fake_daemon, write_config
from tests.systemd.conftest import NotifyReceiver


def test_sigterm_while_loading_stops_at_once(path_notify_socket: NotifyReceiver, tmp_path: Path) -> None:
    config = write_config(tmp_path, [])
    log = tmp_path / "daemon.log"
    env = {"NOTIFY_SOCKET": path_notify_socket.address, "FAKE_LOAD_SECONDS": "60"}
    daemon = spawn_fake_daemon(config, tmp_path / "record", log, env)
    try:
        path_notify_socket.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m, 30, "the load's start timeout extension")
        assert any(m.get("STATUS", "").startswith("loading model") for m in path_notify_socket.messages)
        time.sleep(0.2)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, log.read_text()[-2000:]
        assert time.monotonic() - started < 5
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    path_notify_socket.drain(0.2)
    assert any(m.get("STOPPING") == "1" for m in path_notify_socket.messages)
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "ctl.sock").exists()


class _Recorder:
    def __init__(self) -> None:
        self.extensions: list[float] = []

    def extend_timeout(self, seconds: float) -> bool:
        self.extensions.append(seconds)
        return True


def test_the_start_timeout_is_extended_only_up_to_the_ceiling() -> None:
    notifier = _Recorder()
    keepalive = _ExtendTimeout(notifier, every=0.02, ceiling=0.2)
    keepalive.start()
    time.sleep(0.6)
    count = len(notifier.extensions)
    time.sleep(0.2)
    keepalive.stop()
    assert 5 <= count <= 12  # every 0.02 s for 0.2 s, then no more
    assert len(notifier.extensions) == count
    assert all(s == 0.06 for s in notifier.extensions)
    assert not any(t.name == "phicapd-extend" and t.is_alive() for t in threading.enumerate())


def test_a_stop_during_the_load_extends_no_timeout(path_notify_socket: NotifyReceiver, tmp_path: Path) -> None:
    """During a stop EXTEND_TIMEOUT_USEC extends the stop timeout: none may follow SIGTERM, even
    while the interrupted load still finishes what it was doing (a download's running files)."""
    config = write_config(tmp_path, [])
    env = {
        "NOTIFY_SOCKET": path_notify_socket.address,
        "FAKE_LOAD_SECONDS": "60",
        "FAKE_LOAD_LINGER": "1.5",
        "FAKE_EXTEND_EVERY": "0.05",
    }
    daemon = spawn_fake_daemon(config, tmp_path / "record", tmp_path / "daemon.log", env)
    try:
        path_notify_socket.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m, 30, "the load's keepalive")
        time.sleep(0.3)
        path_notify_socket.drain(0)
        seen = len(path_notify_socket.messages)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    path_notify_socket.drain(0.2)
    after = [m for m in path_notify_socket.messages[seen:] if "EXTEND_TIMEOUT_USEC" in m]
    assert len(after) <= 1, after  # one may have been on its way; 1.5 s at 0.05 s would be ~30
