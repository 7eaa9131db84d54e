"""A state or socket directory the daemon cannot use: one line naming the key and the path, exit
78 (EX_CONFIG), from ``phicapd run`` and from ``phicapd check-config`` alike; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd import config
from phicapd.cli.daemon import main
from phicapd.errors import EX_CONFIG
from phicapd.log import configure_logging

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging("json", "warning")  # ``run`` configures logging on stderr


def _config(tmp_path: Path, *, state: Path | None = None, socket: Path | None = None, extra: str = "") -> Path:
    cfg = tmp_path / "phicapd.toml"
    cfg.write_text(
        f'[state]\ndir = "{state or tmp_path / "state"}"\n[control]\nsocket = "{socket or tmp_path / "ctl.sock"}"\n'
        f'[log]\nformat = "json"\nlevel = "warning"\n{extra}'
    )
    return cfg


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_socket_where_none_can_be_made(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--config", str(_config(tmp_path, socket=Path("/proc/x.sock")))]) == EX_CONFIG
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("phicapd: [control] socket = /proc/x.sock: cannot create files in /proc")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_state_dir_under_a_file(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main([command, "--config", str(_config(tmp_path, state=tmp_path / "file" / "state"))]) == EX_CONFIG
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"phicapd: [state] dir = {tmp_path / 'file' / 'state'}: ")
    assert "not a directory" in err


def test_check_config_rejects_a_missing_watch_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, extra=f'[[watch]]\npath = "{tmp_path / "photos"}"\n')
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    assert f"watch root {tmp_path / 'photos'} does not exist" in _one_line(capsys.readouterr().err)


def test_a_user_without_a_home_is_told_to_set_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n')
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    assert "[state] dir: this user has no home directory" in _one_line(capsys.readouterr().err)


# Imports as root, then runs as nobody, with exactly an unprivileged user's file access.
_AS_NOBODY = f"""
import os, sys
import phicapd.cli.daemon, phicapd.preflight, phicapd.service, phicapd.systemd
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.exit(phicapd.cli.daemon.main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_read_only_state_dir(command: str) -> None:
    with tempfile.TemporaryDirectory() as top:
        base = Path(top)
        base.chmod(0o755)
        (base / "state").mkdir(mode=0o555)
        cfg = _config(base, state=base / "state", socket=base / "ctl.sock")
        cfg.chmod(0o644)
        done = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY, command, "--config", str(cfg)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == EX_CONFIG
    assert _one_line(done.stderr) == (
        f"phicapd: [state] dir = {base / 'state'}: cannot create files in {base / 'state'}: "
        f"permission denied as uid {NOBODY}\n"
    )
