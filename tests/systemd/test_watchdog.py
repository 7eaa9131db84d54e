"""WatchdogFeeder: pings while healthy, silence while the worker is stuck, pings again after."""

from __future__ import annotations

import threading
import time

import pytest

from phicapd.systemd import Notifier, WatchdogFeeder
from tests.systemd.conftest import NotifyReceiver


class Worker:
    """A stand-in for the GPU worker: heartbeats until it is told to hang in a "CUDA call"."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self.last_progress = time.monotonic()
        self.hang = threading.Event()
        self.release = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            if self.hang.is_set():
                self.release.wait()  # blocks like a kernel that never returns
                self.hang.clear()
            self.last_progress = time.monotonic()

    def healthy(self) -> bool:
        return time.monotonic() - self.last_progress < self.stall_after

    def stop(self) -> None:
        self.release.set()
        self._stop.set()
        self.thread.join(2)


def _pings(messages: list[dict[str, str]]) -> int:
    return sum(1 for m in messages if m.get("WATCHDOG") == "1")


def test_pings_while_healthy_stop_when_the_worker_hangs_and_resume(notify_socket: NotifyReceiver) -> None:
    worker = Worker(stall_after=0.3)
    feeder = WatchdogFeeder(Notifier(), worker.healthy, status_text=lambda: "ready: 0 queued", timeout=0.2)
    assert feeder.period == pytest.approx(0.1)
    feeder.start()
    try:
        healthy = notify_socket.drain(0.6)
        assert _pings(healthy) >= 3
        assert all(m["STATUS"] == "ready: 0 queued" for m in healthy)

        worker.hang.set()
        time.sleep(0.5)  # the stall threshold passes
        notify_socket.drain(0.0)
        stuck = notify_socket.drain(0.6)
        assert _pings(stuck) == 0
        assert len(stuck) >= 3, "STATUS keeps being refreshed while the pings are withheld"

        worker.release.set()
        recovered = notify_socket.drain(0.6)
        assert _pings(recovered) >= 2
    finally:
        feeder.stop()
        worker.stop()
    notify_socket.drain(0.0)
    assert notify_socket.drain(0.3) == [], "nothing is sent after stop()"


def test_a_raising_health_check_counts_as_unhealthy(path_notify_socket: NotifyReceiver) -> None:
    def broken() -> bool:
        raise RuntimeError("scheduler gone")

    feeder = WatchdogFeeder(Notifier(), broken, timeout=0.1)
    feeder.start()
    try:
        assert path_notify_socket.drain(0.3) == []
    finally:
        feeder.stop()


def test_interval_comes_from_watchdog_usec(path_notify_socket: NotifyReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    feeder = WatchdogFeeder(Notifier(), lambda: True)
    assert feeder.period == pytest.approx(0.1)
    feeder.start()
    try:
        assert _pings(path_notify_socket.drain(0.45)) >= 3
    finally:
        feeder.stop()


def test_without_a_watchdog_only_the_status_is_refreshed(
    path_notify_socket: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    feeder = WatchdogFeeder(Notifier(), lambda: True, status_text=lambda: "idle", status_period=0.05)
    feeder.start()
    try:
        messages = path_notify_socket.drain(0.3)
    finally:
        feeder.stop()
    assert len(messages) >= 3
    assert all(m == {"STATUS": "idle"} for m in messages)


def test_outside_systemd_no_thread_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    feeder = WatchdogFeeder(Notifier(), lambda: True, status_text=lambda: "x")
    assert not feeder.active
    before = threading.active_count()
    feeder.start()
    assert threading.active_count() == before
    feeder.stop()
