"""phicapctl stats before it reads (issue 18, item 7): a file over the daemon's upload limit is
refused unread, and one that is not a regular file without blocking."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phicapd.cli.ctl import main
from phicapd.config import ControlSettings
from phicapd.control.batch import EX_DATAERR, EX_NOINPUT, BatchCaptioner, Options
from phicapd.control.client import ControlClient
from phicapd.control.server import ControlServer
from tests.control.fakes import GOOD_MAGIC, FakeBackend

REPO = Path(__file__).resolve().parents[2]


class LimitedBackend(FakeBackend):
    """A backend whose status says how large an upload the daemon takes, as ``Daemon.status`` does."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__()
        self.max_body_bytes = max_body_bytes

    def status(self) -> dict[str, Any]:
        return {**super().status(), "max_body_bytes": self.max_body_bytes}


@pytest.fixture
def backend(settings: ControlSettings) -> FakeBackend:
    return LimitedBackend(settings.max_body_bytes)


@pytest.fixture
def sock(server: ControlServer, settings: ControlSettings) -> Path:
    return settings.socket


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk: an image header, then a hole."""
    with path.open("wb") as fh:
        fh.write(GOOD_MAGIC)
        fh.truncate(size)
    return path


def test_a_file_over_the_daemons_limit_is_refused_before_it_is_read_or_sent(
    sock: Path, settings: ControlSettings, backend: FakeBackend, tmp_path: Path, capsys, monkeypatch
) -> None:
    big = sparse(tmp_path / "big.jpg", settings.max_body_bytes + 1)
    small = tmp_path / "small.jpg"
    small.write_bytes(GOOD_MAGIC + b"pixels")
    opened: list[str] = []
    real_open = os.open

    def spying_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spying_open)
    assert main(["--socket", str(sock), "caption-file", str(big), str(small)]) == EX_DATAERR
    err = capsys.readouterr().err
    limit = settings.max_body_bytes  # as the daemon's status reports it
    assert f"{big}: {limit + 1} bytes is over the daemon's limit of {limit} bytes" in err
    assert str(big) not in opened
    # The other file went on; the daemon never saw the big one (no 413: nothing was sent).
    assert [name for name, _ in backend.received] == ["small.jpg"]
    assert (tmp_path / "small.txt").exists() and not (tmp_path / "big.txt").exists()


def test_a_1_gib_file_is_refused_by_a_phicapctl_capped_at_512_mib(sock: Path, tmp_path: Path) -> None:
    """Before, phicapctl read the whole file into memory and only the daemon refused it: under
    the cap that read fails (MemoryError) instead of being refused."""
    big = sparse(tmp_path / "huge.jpg", 1024 * 1024 * 1024)
    cap = 512 * 1024 * 1024

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    done = subprocess.run(
        [sys.executable, "-m", "phicapd.cli.ctl", "--socket", str(sock), "caption-file", str(big)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert done.returncode == EX_DATAERR, done.stderr
    assert "is over the daemon's limit" in done.stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # releases a reader blocked on it (the code before the fix)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_pipe_is_refused_without_blocking_even_if_it_appears_after_the_stat(
    sock: Path, backend: FakeBackend, fifo: Path, capsys
) -> None:
    assert main(["--socket", str(sock), "caption-file", str(fifo)]) == EX_NOINPUT
    assert f"{fifo}: not a regular file" in capsys.readouterr().err
    # A pipe put in the image's place between the plan's stat and the read: refused, not waited on.
    captioner = BatchCaptioner(ControlClient(sock), Options(stdout=True))
    outcome: list[Any] = []
    reader = threading.Thread(target=lambda: outcome.append(captioner._caption(fifo, None)), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "phicapctl blocked opening a pipe"
    assert outcome[0].state == "failed" and outcome[0].code == "input_unreadable"
    assert outcome[0].exit_code == EX_NOINPUT and "a named pipe" in (outcome[0].message or "")
    assert backend.received == []
