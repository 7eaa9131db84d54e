"""A running ControlServer with a fake backend, on a socket in a short temp directory."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd.config import ControlSettings
from phicapd.control.server import ControlServer
from tests.control.fakes import FakeBackend
from tests.control.logs import logs_to


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> Iterator[None]:
    """The server logs every request; keep that off stdout, where phicapctl prints captions."""
    with logs_to(sys.stderr):
        yield


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """pytest's tmp_path can exceed the 107-byte AF_UNIX limit; use a short private directory."""
    d = Path(tempfile.mkdtemp(prefix="pcd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def settings(sock_dir: Path) -> ControlSettings:
    return ControlSettings(
        socket=sock_dir / "ctl.sock",
        max_body_bytes=1024 * 1024,
        max_header_bytes=8 * 1024,
        request_timeout_seconds=2.0,
        caption_timeout_seconds=5.0,
        max_connections=128,
    )


@pytest.fixture
def server(settings: ControlSettings, backend: FakeBackend) -> Iterator[ControlServer]:
    srv = ControlServer(settings, backend)
    srv.start()
    yield srv
    srv.stop()
