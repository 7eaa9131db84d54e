"""The socket file: mode and group, no stealing, stale replacement, socket activation, peer creds."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from phicapd.config import ControlSettings
from phicapd.control.client import ControlClient
from phicapd.control.listener import SocketInUseError
from phicapd.control.server import ControlServer
from phicapd.errors import ConfigError
from tests.control.fakes import FakeBackend


def test_socket_file_is_0660_and_removed_on_stop(settings: ControlSettings, backend: FakeBackend) -> None:
    server = ControlServer(settings, backend)
    server.start()
    st = os.lstat(settings.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    # Nothing of the private staging directory is left next to the socket.
    assert os.listdir(settings.socket.parent) == ["ctl.sock"]
    server.stop()
    assert not settings.socket.exists()


def test_socket_group_is_applied(settings: ControlSettings, backend: FakeBackend) -> None:
    settings = settings.model_copy(update={"socket_group": "nogroup"})
    with ControlServer(settings, backend):
        assert os.lstat(settings.socket).st_gid == 65534


def test_unknown_group_is_a_config_error(settings: ControlSettings, backend: FakeBackend) -> None:
    settings = settings.model_copy(update={"socket_group": "no-such-group-phicapd"})
    with pytest.raises(ConfigError, match="no-such-group-phicapd"):
        ControlServer(settings, backend).start()


def test_a_second_server_does_not_steal_a_live_socket(server: ControlServer, settings: ControlSettings) -> None:
    before = os.lstat(settings.socket).st_ino
    with pytest.raises(SocketInUseError, match="another server is answering"):
        ControlServer(settings, FakeBackend()).start()
    assert os.lstat(settings.socket).st_ino == before
    with ControlClient(settings.socket) as client:
        assert client.status().state == "ready"
    assert len(os.listdir(settings.socket.parent)) == 1


def test_a_stale_socket_is_replaced(settings: ControlSettings, backend: FakeBackend) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(settings.socket))
    dead.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    assert stat.S_ISSOCK(os.lstat(settings.socket).st_mode)
    with ControlServer(settings, backend), ControlClient(settings.socket) as client:
        assert client.version().api == 1


def test_a_path_that_is_not_a_socket_is_left_alone(settings: ControlSettings, backend: FakeBackend) -> None:
    settings.socket.write_text("precious")
    with pytest.raises(SocketInUseError, match="not a socket"):
        ControlServer(settings, backend).start()
    assert settings.socket.read_text() == "precious"


def test_a_directory_open_to_others_is_refused(sock_dir: Path, backend: FakeBackend) -> None:
    shared = sock_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable without the sticky bit: anyone could swap the socket
    with pytest.raises(ConfigError, match="writable by other users"):
        ControlServer(ControlSettings(socket=shared / "ctl.sock"), backend).start()


def test_a_missing_directory_is_created_private(sock_dir: Path, backend: FakeBackend) -> None:
    path = sock_dir / "run" / "ctl.sock"
    with ControlServer(ControlSettings(socket=path), backend):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_socket_activation_uses_the_passed_socket(sock_dir: Path, backend: FakeBackend) -> None:
    path = sock_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    inode = os.lstat(path).st_ino
    # The configured path is elsewhere: only the passed socket may be used.
    settings = ControlSettings(socket=sock_dir / "unused.sock")
    server = ControlServer(settings, backend, listen_socket=listener)
    server.start()
    try:
        assert server.socket_path == path
        with ControlClient(path) as client:
            assert client.health() is True
        assert not settings.socket.exists()
    finally:
        server.stop()
    # The socket unit owns the file: the service must not remove it.
    assert os.lstat(path).st_ino == inode


def test_peer_credentials_are_logged(server: ControlServer, settings: ControlSettings) -> None:
    with capture_logs() as logs, ControlClient(settings.socket) as client:
        client.status()
        client.pause()
        # The server logs right after it sent the reply, which may be after the client read it.
        deadline = time.monotonic() + 2
        while sum(e["event"] == "control request" for e in logs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    requests = [e for e in logs if e["event"] == "control request"]
    assert [(e["method"], e["path"], e["status"]) for e in requests] == [
        ("GET", "/v1/status", 200),
        ("POST", "/v1/pause", 200),
    ]
    for e in requests:
        assert (e["pid"], e["uid"], e["gid"]) == (os.getpid(), os.getuid(), os.getgid())
        assert e["duration_ms"] >= 0
