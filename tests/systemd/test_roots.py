"""check_roots_writable: each failure is real even for root, and names the root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import phicapd.systemd as systemd_module
from phicapd.config import Settings, WatchRoot
from phicapd.errors import ConfigError
from phicapd.systemd import check_roots_writable

REPO = Path(__file__).resolve().parents[2]


def _settings(*roots: Path) -> Settings:
    return Settings(watch=[WatchRoot(path=root) for root in roots])


def test_writable_roots_pass_and_leave_no_probe_behind(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b c"]
    for root in roots:
        root.mkdir()
    check_roots_writable(_settings(*roots))
    assert [list(root.iterdir()) for root in roots] == [[], []]


def test_no_roots_is_fine() -> None:
    check_roots_writable(Settings())


def test_a_missing_root_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    missing = tmp_path / "not here"
    with pytest.raises(ConfigError, match=f"watch root {missing} does not exist"):
        check_roots_writable(_settings(good, missing))


def test_a_missing_root_gets_no_install_unit_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    missing = tmp_path / "not here"
    with pytest.raises(ConfigError) as info:
        check_roots_writable(_settings(missing))
    assert str(info.value) == f"watch root {missing} does not exist"


def test_a_missing_root_under_tmp_in_a_unit_names_private_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123")
    with pytest.raises(ConfigError, match=r"does not exist \(the unit's PrivateTmp=yes gives phicapd a /tmp"):
        check_roots_writable(_settings(Path("/tmp/phicapd-no-such-root-x7")))


_PROBE_AS_NOBODY = f"""
import os, sys
from pathlib import Path
from phicapd.config import Settings, WatchRoot
from phicapd.errors import ConfigError
from phicapd.systemd import check_roots_writable
os.setgroups([]); os.setgid({65534}); os.setuid({65534})
try:
    check_roots_writable(Settings(watch=[WatchRoot(path=Path(sys.argv[1]))]))
except ConfigError as e:
    print(e)
"""


def test_access_denied_gets_the_install_unit_hint(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("drops to nobody: needs root")
    root = tmp_path / "root-only"  # under pytest's 0700 directory: nobody cannot even stat it
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE_AS_NOBODY, str(root)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.stdout.startswith(f"watch root {root} "), result
    assert "Permission denied; under systemd run `phicapd install-unit` to allow it" in result.stdout


def test_a_file_is_not_a_root(tmp_path: Path) -> None:
    file = tmp_path / "photo.jpg"
    file.write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"watch root {file} is not a directory"):
        check_roots_writable(_settings(file))


def _config(tmp_path: Path, *roots: Path, extra: str = "") -> Path:
    config = tmp_path / "phicapd.toml"
    body = f'[state]\ndir = "{tmp_path / "state"}"\n[control]\nsocket = "{tmp_path / "ctl.sock"}"\n{extra}'
    config.write_text(body + "".join(f'[[watch]]\npath = "{root}"\n' for root in roots))
    return config


def _phicapd_run(config: Path, *, wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``phicapd run --config`` as systemd starts it; the model is never reached on these paths."""
    argv = [*(wrapper or []), sys.executable, "-m", "phicapd.cli.daemon", "run", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_phicapd_run_exits_78_naming_a_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = _phicapd_run(_config(tmp_path, missing))
    assert result.returncode == 78, result.stderr
    assert f"watch root {missing} does not exist" in result.stderr


def test_phicapd_run_exits_78_on_a_bad_config(tmp_path: Path) -> None:
    result = _phicapd_run(_config(tmp_path, extra="[model]\nnum_crops = 0\n"))
    assert result.returncode == 78, result.stderr
    assert "model.num_crops" in result.stderr


def test_a_read_only_mount_is_unwritable_even_for_root(tmp_path: Path) -> None:
    """What ProtectSystem=strict does to an unlisted root: a read-only bind mount (in a private
    mount namespace, so nothing outside the child process sees it)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(8)")
    good, readonly = tmp_path / "good", tmp_path / "read only"
    good.mkdir()
    readonly.mkdir()
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 77; shift; exec "$@"'
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(readonly)]
    result = _phicapd_run(_config(tmp_path, good, readonly), wrapper=wrapper)
    if result.returncode == 77 or "unshare failed" in result.stderr or "Operation not permitted" in result.stderr:
        pytest.skip(f"no private read-only mount here: {result.stderr.strip()}")
    assert result.returncode == 78, result.stderr
    assert f"watch root {readonly} is not writable" in result.stderr
    assert "Read-only file system" in result.stderr
    assert "run `phicapd install-unit` to allow it" in result.stderr  # what the unit's sandbox does too
    assert str(good) not in result.stderr.replace(str(readonly), "")
    assert list(readonly.iterdir()) == []


def test_a_root_that_does_not_answer_does_not_hold_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hung, fine = tmp_path / "nas", tmp_path / "local"
    hung.mkdir()
    fine.mkdir()
    release = threading.Event()
    real = systemd_module._probe

    def probe(root: Path) -> None:  # a hard-mounted NFS share that stopped answering
        if root == hung:
            release.wait(10)
        real(root)

    monkeypatch.setattr(systemd_module, "_probe", probe)
    monkeypatch.setattr(systemd_module, "PROBE_SECONDS", 0.3)
    started = time.monotonic()
    try:
        check_roots_writable(Settings(watch=[WatchRoot(path=hung), WatchRoot(path=fine)]))
    finally:
        release.set()
    assert time.monotonic() - started < 2
    assert f"watch root {hung} does not answer" in caplog.text
    # A root that answers with an error still stops the start, hung one or not.
    with pytest.raises(ConfigError, match="does not exist"):
        check_roots_writable(Settings(watch=[WatchRoot(path=tmp_path / "missing")]))
