"""``phicapd check-config`` refuses what ``run`` refuses, short of loading weights: the same
device and checkpoint-directory checks (``preflight.check_backend``), the same exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phicapd.cli.daemon import main
from phicapd.config import ModelSettings
from phicapd.errors import EX_CONFIG, ConfigError
from phicapd.model.loading import load_from_settings


def _config(tmp_path: Path, model: str) -> Path:
    cfg = tmp_path / "phicapd.toml"
    cfg.write_text(
        f'[model]\n{model}\n[state]\ndir = "{tmp_path / "state"}"\n[control]\nsocket = "{tmp_path / "ctl.sock"}"\n'
    )
    return cfg


def test_a_model_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    assert main(["check-config", "--config", str(_config(tmp_path, f'path = "{missing}"'))]) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.err == f"phicapd: model path {missing} is not a directory\n"
    assert captured.out == ""
    # ``run`` refuses it with the same words (the load never reaches a weight).
    with pytest.raises(ConfigError, match=f"^model path {missing} is not a directory$"):
        load_from_settings(ModelSettings(path=missing, device="cpu"))


def test_a_device_torch_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(_config(tmp_path, 'device = "gpu"'))]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("phicapd: model.device 'gpu' is not a valid torch device"), err
    with pytest.raises(ConfigError, match=r"model\.device 'gpu' is not a valid torch device"):
        load_from_settings(ModelSettings(device="gpu"))


def test_a_directory_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert main(["check-config", "--config", str(_config(tmp_path, f'path = "{empty}"\ndevice = "cpu"'))]) == 1
    assert f"{empty} has neither model.safetensors.index.json nor model.safetensors" in capsys.readouterr().err


def test_a_usable_checkpoint_passes(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f'path = "{tiny_checkpoint}"\ndevice = "cpu"')
    assert main(["check-config", "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"]["path"] == str(tiny_checkpoint)
    assert captured.err == ""


def test_a_model_not_cached_is_a_note_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, 'id = "someone/not-cached"\ndevice = "cpu"')
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert "model someone/not-cached@main is not in the Hugging Face cache" in capsys.readouterr().err
