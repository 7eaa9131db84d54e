"""Socket activation with real inherited fds, the way systemd passes them (fd 3 onwards)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from phicapd.systemd import listen_fds

REPO = Path(__file__).resolve().parents[2]

# Plays systemd's part after fork(): move the passed fds to 3, 4, ..., set LISTEN_PID to the pid
# that exec() keeps, then run the child.
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    fds = [int(a) for a in sys.argv[1].split(",")]
    dups = [os.dup(fd) for fd in fds]
    for target, fd in enumerate(dups, start=3):
        os.dup2(fd, target)
        os.set_inheritable(target, True)  # dup2(3, 3) is a no-op that keeps dup()'s CLOEXEC
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
    """
)

CHILD = textwrap.dedent(
    """
    import json, os, socket
    from phicapd.systemd import listen_fds_with_names
    got = listen_fds_with_names()
    out = {"names": [n for n, _ in got], "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
    out["inheritable"] = [os.get_inheritable(s.fileno()) for _, s in got]
    out["kinds"] = [[s.family.name, s.type.name, s.fileno()] for _, s in got]
    unix = got[0][1]
    conn, _ = unix.accept()
    conn.sendall(b"hello from fd 3")
    conn.close()
    print(json.dumps(out))
    """
)


def _spawn(socks: list[socket.socket], env: dict[str, str]) -> subprocess.Popen[str]:
    fds = [s.fileno() for s in socks]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), CHILD],
        pass_fds=fds,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_passed_sockets_are_adopted_named_and_the_environment_is_cleared() -> None:
    with tempfile.TemporaryDirectory(prefix="sdl-", dir="/tmp") as directory:
        path = os.path.join(directory, "ctl.sock")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(path)
        unix.listen()
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        child = _spawn([unix, tcp], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:metrics"})
        unix.close()
        tcp.close()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)
        client.connect(path)
        assert client.recv(100) == b"hello from fd 3"
        client.close()
        out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    result = json.loads(out)
    assert result["names"] == ["control", "metrics"]
    assert result["kinds"] == [["AF_UNIX", "SOCK_STREAM", 3], ["AF_INET", "SOCK_STREAM", 4]]
    assert result["env"] == [], "LISTEN_* must not leak to the daemon's children"
    assert result["inheritable"] == [False, False]


def test_fds_meant_for_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_no_activation_means_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert listen_fds() == []


def test_environment_can_be_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"
