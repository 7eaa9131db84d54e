"""Exit codes of ``phicapd run`` / ``download-model`` when the model cannot be loaded: 75
(EX_TEMPFAIL, systemd restarts) when it may work later, 78 (EX_CONFIG, never restarted) when a
setting is wrong. Runs the real CLI and daemon in-process up to the model load."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd.cli.daemon import main
from phicapd.errors import EX_CONFIG, EX_TEMPFAIL, ModelUnavailable
from phicapd.log import configure_logging


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon waits up to an hour for a model that is not available yet; not here."""
    monkeypatch.setattr("phicapd.service.LOAD_CEILING_SECONDS", 0.0)


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """``phicapd run`` installs SIGTERM/SIGINT handlers and configures logging on stderr."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    configure_logging("json", "warning")


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "phicapd.toml"
    cfg.write_text(
        f'[state]\ndir = "{tmp_path / "state"}"\n[control]\nsocket = "{tmp_path / "ctl.sock"}"\n'
        f'[log]\nformat = "json"\nlevel = "warning"\n{extra}'
    )
    return cfg


def test_run_exits_75_when_the_model_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from phicapd.model import captioner

    def unavailable(settings: object) -> None:
        raise ModelUnavailable("cannot fetch model m@main now: network is unreachable")

    monkeypatch.setattr(captioner, "load_captioner", unavailable)
    assert main(["run", "--config", str(_config(tmp_path))]) == EX_TEMPFAIL
    err = capsys.readouterr().err
    assert "network is unreachable" in err and '"code": "model_unavailable"' in err
    assert not (tmp_path / "ctl.sock").exists()  # the daemon shut its socket down on the way out


def test_run_exits_75_when_the_hub_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def snapshot_download(*args: object, local_files_only: bool = False, **kwargs: object) -> str:
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cfg = _config(tmp_path, '[model]\nid = "someone/model"\ndevice = "cpu"\n')
    assert main(["run", "--config", str(cfg)]) == EX_TEMPFAIL
    assert "someone/model@main" in capsys.readouterr().err
    assert main(["download-model", "--config", str(cfg)]) == EX_TEMPFAIL


def test_run_exits_78_for_a_model_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f'[model]\npath = "{tmp_path / "nowhere"}"\ndevice = "cpu"\n')
    assert main(["run", "--config", str(cfg)]) == EX_CONFIG
    assert "is not a directory" in capsys.readouterr().err


def test_run_exits_78_for_a_malformed_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    cfg = _config(tmp_path, f'[model]\npath = "{model}"\ndevice = "cpu"\n')
    assert main(["run", "--config", str(cfg)]) == EX_CONFIG
    assert "phi3_v" in capsys.readouterr().err


def test_every_command_and_option_is_described_and_the_exit_codes_listed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from phicapd.cli.daemon import _parser

    parser = _parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["make-test-model", "--help"])
    out = capsys.readouterr().out
    assert "--seed SEED  seed of the random weights (default: 0)" in out
    assert "\n  75 " not in out and "`phicapd --help` lists the others" in out  # the table is printed once
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in (0, 1, 70, 75, 78):
        assert f"\n  {code} " in out


def test_make_test_model_where_nothing_can_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["make-test-model", str(tmp_path / "file" / "model")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith(f"phicapd: cannot write {tmp_path / 'file' / 'model'}: Not a directory\n")
