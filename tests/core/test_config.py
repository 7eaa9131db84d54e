"""Configuration: the TOML file, environment overrides, and one clear message + exit 78 per mistake."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest

from phicapd.cli.daemon import main
from phicapd.config import DEFAULT_PROMPT, Settings, load_settings, sidecar_ignore_pattern
from phicapd.errors import EX_CONFIG, ConfigError
from phicapd.fetch import AddressPolicy
from phicapd.pipeline.paths import is_candidate, list_images

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_valid_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(REPO / "config.example.toml")
    assert settings.model.num_crops == 16
    assert settings.model.prompt == DEFAULT_PROMPT
    assert settings.sidecar.extension == ".txt"


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nnum_crops = 4\n[log]\nlevel = "debug"\n')
    monkeypatch.setenv("PHICAPD_MODEL__NUM_CROPS", "8")
    settings = load_settings(cfg)
    assert settings.model.num_crops == 8
    assert settings.log.level == "debug"


def test_watch_roots_and_effective_policy(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[sidecar]\nexisting = "skip"\n[[watch]]\npath = "{tmp_path}/a"\n'
        'existing = "overwrite"\nprompt = "Alt text."\n'
        f'[[watch]]\npath = "{tmp_path}/b"\nrecursive = false\n'
    )
    s = load_settings(cfg)
    a, b = s.watch
    assert s.existing_policy(a) == "overwrite" and s.existing_policy(b) == "skip"
    assert s.prompt_for(a) == "Alt text." and s.prompt_for(b) == DEFAULT_PROMPT
    assert not b.recursive


def test_only_missing_globally_and_per_root(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[sidecar]\nexisting = "only-missing"\n[[watch]]\npath = "{tmp_path}/a"\n'
        f'[[watch]]\npath = "{tmp_path}/b"\nexisting = "skip"\n'
        f'[[watch]]\npath = "{tmp_path}/c"\nexisting = "only-missing"\n'
    )
    s = load_settings(cfg)
    assert s.sidecar.existing == "only-missing"
    assert [s.existing_policy(r) for r in s.watch] == ["only-missing", "skip", "only-missing"]
    cfg.write_text(f'[[watch]]\npath = "{tmp_path}/a"\nexisting = "only-missing"\n')
    s = load_settings(cfg)
    assert s.sidecar.existing == "skip" and s.existing_policy(s.watch[0]) == "only-missing"


BAD_CONFIGS = [
    ('[model]\nnum_crops = "many"\n', "model.num_crops"),
    ("[model]\ncolour = 1\n", "model.colour: unknown key"),
    ("[bogus]\nx = 1\n", "bogus: unknown key"),
    ("[model\n", "not valid TOML"),
    ('[[watch]]\npath = "relative/dir"\n', "watch[0].path"),
    ("[[watch]]\nrecursive = true\n", "watch[0].path: Field required"),
    (
        '[sidecar]\nexisting = "sometimes"\n',
        "sidecar.existing: Input should be 'skip', 'overwrite' or 'only-missing'",
    ),
    ('[sidecar]\nexisting = "only_missing"\n', "sidecar.existing: Input should be"),
    ('[[watch]]\npath = "/srv/a"\nexisting = "never"\n', "watch[0].existing: Input should be 'skip'"),
    ('[sidecar]\nextension = "txt"\n', "sidecar.extension"),
    ('[log]\nformat = "xml"\n', "log.format"),
    ("[model]\nmax_new_tokens = 0\n", "model.max_new_tokens"),
    ('[[watch]]\npath = "/srv/a"\n[[watch]]\npath = "/srv/a"\n', "listed twice"),
    ('[fetch]\nallow_networks = ["10.0.0.0/8", "10.0.0.300/8"]\n', "fetch.allow_networks: Value error, '10.0.0.300/8'"),
    ('[fetch]\nallow_networks = ["10.0.0.0/33"]\n', "fetch.allow_networks: Value error, '10.0.0.0/33'"),
    ('[fetch]\nallow_networks = ["intranet"]\n', "fetch.allow_networks: Value error, 'intranet'"),
    ('[fetch]\nproxy = "proxy.internal:3128"\n', "fetch.proxy: Value error, 'proxy.internal:3128'"),
    ('[fetch]\nproxy = "socks5://proxy.internal:1080"\n', "fetch.proxy: Value error, 'socks5://proxy.internal:1080'"),
    (
        '[fetch]\nproxy = "http://"\n',
        "fetch.proxy: Value error, 'http://' is not an http:// or https:// URL with a host",
    ),
    ('[fetch]\nproxy = "http://proxy.internal:99999"\n', "fetch.proxy: Value error, 'http://proxy.internal:99999'"),
    ("[fetch]\nproxy = 3128\n", "fetch.proxy: Input should be a valid string"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_exits_78_with_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert expected in err
    assert str(cfg) in err
    assert "Traceback" not in err


def test_missing_explicit_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == EX_CONFIG
    assert "does not exist" in capsys.readouterr().err


def test_bad_env_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHICAPD_SCHEDULER__DECODE_WORKERS", "zero")
    with pytest.raises(ConfigError, match=r"scheduler\.decode_workers"):
        load_settings(None)


def test_check_config_prints_effective_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nnum_crops = 4\n")
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_crops"] == 4
    assert out["sidecar"]["existing"] == "skip"


def test_fetch_networks_and_proxy_that_fetch_accepts(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[fetch]\nallow_networks = ["10.0.0.0/8", "192.168.1.7", "10.1.2.3/16", "fd00::/8"]\n'
        'proxy = "https://user:pw@proxy.internal:3128"\n'
    )
    fetch = load_settings(cfg).fetch
    assert fetch.allow_networks == ["10.0.0.0/8", "192.168.1.7", "10.1.2.3/16", "fd00::/8"]  # kept as written
    assert fetch.proxy == "https://user:pw@proxy.internal:3128"
    AddressPolicy.from_settings(fetch)  # what every caption-url does with them


@pytest.mark.parametrize("value", ['""', '"  "'])
def test_an_empty_proxy_is_no_proxy(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[fetch]\nproxy = {value}\n")
    assert load_settings(cfg).fetch.proxy is None


def test_a_bad_proxy_url_does_not_echo_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[fetch]\nproxy = "socks5://alice:s3cret@proxy.internal:1080"\n')
    assert main(["check-config", "--config", str(cfg)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "fetch.proxy" in err and "socks5://***@proxy.internal:1080" in err
    assert "s3cret" not in err and "alice" not in err


def test_a_root_including_everything_never_takes_our_sidecars(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[watch]]\npath = "{tmp_path}"\ninclude = ["*"]\nignore = ["raw/*", "*.toml"]\n')
    root = load_settings(cfg).watch[0]
    assert root.ignore == ["raw/*", "*.toml", "*.[tT][xX][tT]"]
    assert is_candidate(tmp_path / "photo.jpg", root)
    assert is_candidate(tmp_path / "sub" / "notes.md", root)
    for name in ("photo.txt", "photo.jpg.txt", "sub/photo.txt", "PHOTO.TXT", "photo.Txt"):
        assert not is_candidate(tmp_path / name, root), name
    assert is_candidate(tmp_path / "photo.txt.jpg", root)
    for name in ("photo.jpg", "photo.txt", "photo.png", "photo.png.txt"):
        (tmp_path / name).write_bytes(b"")
    # What the sidecar naming rule sees: the sidecars are not images with a stem of their own.
    assert sorted(list_images(tmp_path, root)) == ["photo.jpg", "photo.png"]


def test_the_sidecar_pattern_follows_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHICAPD_SIDECAR__EXTENSION", ".c?p")
    settings = Settings(watch=[{"path": "/srv/a", "include": ["*"]}, {"path": "/srv/b"}])
    assert [r.ignore for r in settings.watch] == [["*.[cC][?][pP]"]] * 2
    root = settings.watch[0]
    assert not is_candidate(Path("/srv/a/x.c?p"), root) and not is_candidate(Path("/srv/a/x.C?P"), root)
    assert is_candidate(Path("/srv/a/x.cap"), root) and is_candidate(Path("/srv/a/x.txt"), root)


def test_the_sidecar_pattern_is_added_once() -> None:
    settings = Settings(watch=[{"path": "/srv/a", "ignore": ["*.[tT][xX][tT]", "tmp/*"]}])
    assert settings.watch[0].ignore == ["*.[tT][xX][tT]", "tmp/*"]
    again = Settings(**settings.model_dump())  # what check-config prints loads back unchanged
    assert again.watch[0].ignore == ["*.[tT][xX][tT]", "tmp/*"]


@pytest.mark.parametrize(
    ("extension", "pattern"), [(".txt", "*.[tT][xX][tT]"), (".cap-1", "*.[cC][aA][pP]-1"), (".[x]", "*.[[][xX]]")]
)
def test_sidecar_ignore_pattern(extension: str, pattern: str) -> None:
    assert sidecar_ignore_pattern(extension) == pattern
    assert fnmatch.fnmatchcase("photo" + extension, pattern)
    assert fnmatch.fnmatchcase("photo" + extension.upper(), pattern)
    assert not fnmatch.fnmatchcase("photo" + extension + ".jpg", pattern)


def test_decode_workers_follow_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from phicapd.config import SchedulerSettings

    for cpus, workers in ((1, 2), (2, 2), (6, 3), (16, 8), (128, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert SchedulerSettings().decode_workers == workers
    assert SchedulerSettings(decode_workers=12).decode_workers == 12


def test_check_config_hides_the_proxy_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[fetch]\nproxy = "http://alice:s3cret@proxy.internal:3128"\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert json.loads(out)["fetch"]["proxy"] == "http://***@proxy.internal:3128"


def test_a_misspelt_environment_override_is_named_with_the_nearest_valid_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PHICAPD_MODLE__DEVICE", "cpu")
    assert main(["check-config"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "PHICAPD_MODLE__DEVICE: not a phicapd setting (did you mean PHICAPD_MODEL__DEVICE?)" in err
    assert "Traceback" not in err


def test_a_lowercase_override_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("phicapd_model__devise", "cpu")
    with pytest.raises(
        ConfigError, match=r"phicapd_model__devise: not a phicapd setting \(did you mean PHICAPD_MODEL__DEVICE\?\)"
    ):
        load_settings(None)


@pytest.mark.parametrize(
    "name",
    ["PHICAPD_SOCKET", "PHICAPD_CONFIG", "PHICAPD_MODEL__DEVICE", "PHICAPD_WATCH", "PHICAPD_TEST_COMPILE_BACKEND"],
)
def test_documented_variables_stay_valid(name: str) -> None:
    from phicapd.config import check_environment

    check_environment({name: "x"})  # raises ConfigError for a name it does not know


def test_every_documented_phicapd_variable_is_known() -> None:
    """The README, the example config and the code name no variable that check_environment refuses."""
    import re

    from phicapd.config import OTHER_ENV_VARIABLES, TEST_ENV_PREFIX, setting_env_names

    repo = Path(__file__).resolve().parents[2]
    texts = [repo / "README.md", *(repo / "docs").glob("*.md"), repo / "config.example.toml"]
    texts += (repo / "phicapd").rglob("*.py")
    named = {m for p in texts for m in re.findall(r"PHICAPD_[A-Z0-9_]*[A-Z0-9]", p.read_text())}
    named -= {"PHICAPD_SECTION__KEY", "PHICAPD_MODLE__DEVICE"}  # the pattern itself, the typo shown
    named = {n for n in named if not (n + "_").startswith(TEST_ENV_PREFIX)}  # the test suite's own
    assert named - {*setting_env_names(), *OTHER_ENV_VARIABLES} == set()


def test_phicapd_config_names_the_file_when_config_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nnum_crops = 4\n")
    monkeypatch.setenv("PHICAPD_CONFIG", str(cfg))
    assert main(["check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["num_crops"] == 4
    monkeypatch.setenv("PHICAPD_CONFIG", str(tmp_path / "nope.toml"))  # named, so it must exist
    assert main(["check-config"]) == EX_CONFIG
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in capsys.readouterr().err


def test_the_test_suites_own_variables_are_not_settings_nor_typos() -> None:
    from phicapd.config import check_environment

    check_environment({"PHICAPD_TEST_VLLM_VENV": "/opt/v", "PHICAPD_TEST_COMPILE_BACKEND": "inductor"})
    with pytest.raises(ConfigError, match="PHICAPD_TSET_X"):
        check_environment({"PHICAPD_TSET_X": "1"})


def test_checking_a_config_imports_nothing_of_the_pipeline(tmp_path: Path) -> None:
    """config sits on the bottom floor: even the pyexiv2 check for xmp/embed roots stays there."""
    import subprocess
    import sys

    root = tmp_path / "in"
    root.mkdir()
    config = tmp_path / "phicapd.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n[[watch]]\npath = "{root}"\nformats = ["txt", "xmp"]\n')
    script = (
        "import sys; from phicapd.config import load_settings; load_settings(__import__('pathlib').Path(sys.argv[1]));"
        " print(sorted(m for m in sys.modules if m.startswith('phicapd.pipeline')))"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, env=env, cwd=repo, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
