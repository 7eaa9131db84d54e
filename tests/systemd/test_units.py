"""The unit files: lint that needs no systemd, and systemd-analyze where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"


def _settings(name: str) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file (systemd has no trailing comments, so neither do we)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", ["phicapd.service", "phicapd.socket"])
def test_no_comment_shares_a_line_with_a_setting(name: str) -> None:
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            assert re.fullmatch(r"[A-Za-z]+=[^#;]*", line), f"{name}: {line!r}"


def test_service_essentials() -> None:
    s = _settings("phicapd.service")
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "phicapd",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "KillMode": "mixed",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "PrivateDevices": "no",
        "MemoryDenyWriteExecute": "no",
        "UMask": "0027",
    }.items():
        assert s.get(key) == [value], key
    assert "RuntimeDirectory" not in s, "the socket unit owns /run/phicapd; the service must not delete it"
    assert any(v.startswith("HF_HOME=%C/phicapd/") for v in s["Environment"])
    assert {"/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia-caps rw"} <= set(s["DeviceAllow"])
    # The drain grace is 30 s: systemd must not SIGKILL a draining daemon.
    assert s["TimeoutStopSec"] == ["45s"]


def test_socket_essentials() -> None:
    s = _settings("phicapd.socket")
    assert s["ListenStream"] == ["/run/phicapd/phicapd.sock"]
    assert s["SocketMode"] == ["0660"]
    assert s["SocketGroup"] == ["phicapd-clients"]
    assert s["Service"] == ["phicapd.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_ci_systemd_check_passes() -> None:
    """verify (units and a sample drop-in), sysusers/tmpfiles and the exposure gate of 2.0."""
    result = subprocess.run(
        ["bash", str(REPO / ".ci" / "systemd-check")], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scores = re.findall(r"exposure \(phicapd.service as shipped\): ([0-9.]+)", result.stdout)
    assert scores and float(scores[0]) <= 2.0
