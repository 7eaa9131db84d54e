"""Notifier and watchdog_interval against a real AF_UNIX datagram socket."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from phicapd.systemd import Notifier, watchdog_interval
from tests.systemd.conftest import NotifyReceiver


def test_each_message_arrives_as_one_datagram(notify_socket: NotifyReceiver) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.status("loading model x")
    assert notifier.extend_timeout(60)
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.send(status="two fields", mainpid=42)
    notifier.close()
    assert notify_socket.drain(1.0) == [
        {"STATUS": "loading model x"},
        {"EXTEND_TIMEOUT_USEC": "60000000"},
        {"READY": "1"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
        {"STATUS": "two fields", "MAINPID": "42"},
    ]


def test_a_newline_in_a_value_cannot_inject_a_second_assignment(path_notify_socket: NotifyReceiver) -> None:
    Notifier().status("file a.jpg\nREADY=1")
    assert path_notify_socket.drain(1.0) == [{"STATUS": "file a.jpg READY=1"}]


def test_fractional_extend_timeout_is_whole_microseconds(path_notify_socket: NotifyReceiver) -> None:
    Notifier().extend_timeout(1.5)
    assert path_notify_socket.drain(1.0) == [{"EXTEND_TIMEOUT_USEC": "1500000"}]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()


def test_a_non_unix_address_disables_notifications(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not Notifier().enabled


def test_send_failure_is_logged_once_and_never_raised(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A path where nothing listens: every sendto fails with ENOENT.
    notifier = Notifier(os.path.join(tmp_path, "gone"))
    with caplog.at_level(logging.DEBUG, logger="phicapd.systemd"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gone" in warnings[0].getMessage()


def test_send_after_receiver_closed_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0phicapd-test-closing")
    monkeypatch.setenv("NOTIFY_SOCKET", "@phicapd-test-closing")
    notifier = Notifier()
    assert notifier.ready()
    receiver.close()
    assert not notifier.watchdog()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("250000", None, 0.25),
        ("30000000", "1", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected
