"""A real ``NOTIFY_SOCKET``: an AF_UNIX datagram socket bound to a path or an abstract name."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest


class NotifyReceiver:
    """The systemd side of sd_notify: collects every datagram, one message per datagram."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.messages: list[dict[str, str]] = []

    def drain(self, timeout: float = 0.0) -> list[dict[str, str]]:
        """Receive what arrives within ``timeout`` seconds; returns the new messages."""
        new: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                break
            new.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        self.messages.extend(new)
        return new

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = len(self.messages)
        while time.monotonic() < deadline:
            self.drain(0.05)
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
        raise AssertionError(f"no {what} within {timeout} s; got {self.messages}")


def _receiver(abstract: bool) -> Iterator[NotifyReceiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory = None
    if abstract:
        name = f"phicapd-test-{secrets.token_hex(6)}"
        sock.bind(f"\0{name}")
        address = f"@{name}"
    else:
        # Short, because AF_UNIX paths are limited to 107 bytes and pytest's tmp_path is long.
        directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
        address = os.path.join(directory, "notify")
        sock.bind(address)
    try:
        yield NotifyReceiver(sock, address)
    finally:
        sock.close()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    """Bound and exported as ``$NOTIFY_SOCKET``, once as a path and once as an ``@abstract`` name."""
    for receiver in _receiver(request.param == "abstract"):
        monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
        yield receiver


@pytest.fixture
def path_notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    for receiver in _receiver(False):
        monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
        yield receiver
