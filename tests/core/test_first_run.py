"""The first run without the model's weights: one line that says the three ways forward, and
``phicapctl status`` says why the daemon is still loading."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from phicapd.cli.ctl import main as phicapctl
from phicapd.config import ModelSettings
from phicapd.control.client import ControlClient
from phicapd.errors import ModelUnavailable
from phicapd.model.loading import download_model
from phicapd.service import Daemon
from tests.support.daemon import settings_for, wait_for
from tests.support.fakes import FakeCaptioner

# What huggingface_hub says when it cannot reach the hub: several lines of advice.
HUB_OFFLINE = (
    "Got: ConnectError: [Errno -2] Name or service not known\n"
    "An error happened while trying to locate the files on the Hub, and we cannot find the "
    "appropriate snapshot folder for the specified revision on the local disk. Please check your "
    "internet connection and try again."
)


def test_no_network_and_no_weights_says_the_ways_forward_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError(HUB_OFFLINE)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelUnavailable) as raised:
        download_model(ModelSettings(id="microsoft/Phi-3.5-vision-instruct"), progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "Name or service not known" in message
    for way in ("reach huggingface.co", "set [model] path to a local checkpoint", "`phicapd make-test-model DIR`"):
        assert way in message


def test_status_says_why_the_model_is_still_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("phicapd.service.LOAD_RETRY_SECONDS", 30.0)

    def down(_settings: object) -> FakeCaptioner:
        raise ModelUnavailable("cannot fetch model m@main now (the hub or the network failed: no route)")

    settings = settings_for(tmp_path, [])
    daemon = Daemon(settings, down)
    thread = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        client = ControlClient(settings.control.socket)
        wait_for(
            lambda: settings.control.socket.exists() and "no route" in str(client.status().model_dump()),
            10,
            "the load error in the status",
        )
        model = client.status().model_dump()["model"]
        assert model["loading"].startswith("waiting for the model, trying again every 30 s or more: cannot fetch")
        assert phicapctl(["--socket", str(settings.control.socket), "status"]) == 0
        lines = capsys.readouterr().out.splitlines()  # the daemon's console log lands here too
        reason = lines.index(f"not ready: {model['loading']}")
        assert lines[reason + 1].startswith("state ")  # before the table, which lacks it
        assert not any("trying again" in line for line in lines[reason + 1 :])
    finally:
        daemon.request_stop()
        thread.join(10)
    assert not thread.is_alive()


def _start_logs(settings_dir: Path, roots: list[Path]) -> list[dict[str, object]]:
    """What the daemon logs up to the model load (here refused at once, so nothing runs on)."""
    from structlog.testing import capture_logs

    from phicapd.errors import ConfigError

    def refuse(_settings: object) -> FakeCaptioner:
        raise ConfigError("no model in this test")

    daemon = Daemon(settings_for(settings_dir, roots), refuse)
    with capture_logs() as logs, pytest.raises(ConfigError):
        daemon.run(install_signals=False)
    return logs


def test_a_daemon_without_roots_says_how_to_add_one(tmp_path: Path) -> None:
    warnings = [e for e in _start_logs(tmp_path, []) if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["no watch roots: no directory is watched"]
    assert 'add a [[watch]] table with path = "/absolute/dir"' in str(warnings[0]["hint"])
    root = tmp_path / "inbox"
    root.mkdir()
    (tmp_path / "again").mkdir()
    assert not [e for e in _start_logs(tmp_path / "again", [root]) if e["log_level"] == "warning"]


def test_the_socket_is_announced_once(tmp_path: Path) -> None:
    events = [e["event"] for e in _start_logs(tmp_path, [])]
    assert events.count("control socket listening") == 1
