"""``[model] backend`` and ``[remote]``: defaults, validation, check-config, reload."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from phicapd.cli.daemon import main
from phicapd.config import RemoteSettings, Settings, load_settings
from phicapd.errors import EX_CONFIG
from phicapd.reload import live_settings, restart_only_changes

REPO = Path(__file__).resolve().parents[2]


def test_native_is_the_default_and_remote_has_safe_defaults() -> None:
    settings = Settings()
    assert settings.model.backend == "native"
    assert settings.remote.tls_verify is True
    assert settings.remote.endpoints == [] and settings.remote.api_key_file is None


def test_the_example_documents_every_remote_key() -> None:
    text = (REPO / "config.example.toml").read_text()
    section = text.split("# [remote]\n", 1)[1].split("\n\n", 1)[0]
    documented = tomllib.loads("\n".join(line.removeprefix("# ") for line in section.splitlines()))
    assert set(documented) == set(RemoteSettings.model_fields)
    Settings(model={"backend": "openai"}, remote={**documented, "api_key_file": None, "ca_file": None})


def test_a_remote_config_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[model]\nbackend = "openai"\n[remote]\nendpoints = ["http://gpu1:8000/v1/", " https://gpu2.lan/v1"]\n'
        'model = "phi35v"\ntimeout_seconds = 30\n'
    )
    remote = load_settings(cfg).remote
    assert remote.endpoints == ["http://gpu1:8000/v1", "https://gpu2.lan/v1"]
    assert remote.model == "phi35v" and remote.timeout_seconds == 30


BAD = [
    ('[model]\nbackend = "openai"\n', "needs [remote] endpoints"),
    ('[model]\nbackend = "vllm"\n', "model.backend"),
    ('[remote]\nendpoints = ["gpu1:8000/v1"]\n', "is not an http:// or https:// URL"),
    ('[remote]\nendpoints = ["http://gpu1:8000"]\n', "must end in /v1"),
    ('[remote]\nendpoints = ["http://gpu1/v1", "http://gpu1/v1/"]\n', "is listed twice"),
    ('[remote]\nendpoints = ["http://u:s3cret@gpu1/v1"]\n', "put the API key in api_key_file"),
    ("[remote]\ninitial_in_flight = 9\nmax_in_flight = 8\n", "initial_in_flight (9) is above max_in_flight (8)"),
    ("[remote]\ntimeout_seconds = 0\n", "remote.timeout_seconds"),
    ("[remote]\nendpoint = []\n", "remote.endpoint: unknown key"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_remote_config_exits_78_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert "s3cret" not in err


def test_check_config_reads_the_key_file_but_never_prints_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-very-secret\n")
    cfg = tmp_path / "c.toml"
    state = tmp_path / "state"
    cfg.write_text(
        f'[model]\nbackend = "openai"\n[remote]\nendpoints = ["http://gpu1:8000/v1"]\napi_key_file = "{key}"\n'
        f'[state]\ndir = "{state}"\n[control]\nsocket = "{tmp_path / "s.sock"}"\n'
    )
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret" not in out
    assert json.loads(out)["remote"]["api_key_file"] == str(key)
    key.unlink()
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    assert f"api_key_file {key} does not exist" in capsys.readouterr().err


def test_remote_and_backend_changes_need_a_restart() -> None:
    old = Settings()
    new = Settings(model={"backend": "openai"}, remote={"endpoints": ["http://gpu1:8000/v1"]})
    assert restart_only_changes(old, new) == ["model.backend", "remote.endpoints"]
    live = live_settings(old, new)
    assert live.model.backend == "native" and live.remote.endpoints == []
