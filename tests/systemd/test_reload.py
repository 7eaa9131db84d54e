"""Reload on SIGHUP (``systemctl reload phicapd``): the configuration is read again and what can
change live is applied without unloading the model; what needs a restart is named and kept;
an invalid file changes nothing; the process never dies of SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from phicapd.captioner import Caption, CaptionRequest
from phicapd.config import load_settings
from phicapd.reload import live_settings, restart_only_changes
from tests.support.daemon import (
    is_settled,
    running_daemon,
    socket_ready,
    spawn_fake_daemon,
    wait_for,
    write_config,
)
from tests.support.fakes import FakeCaptioner, write_unique_png
from tests.systemd.conftest import NotifyReceiver

NEW_PROMPT = "Write alt text for a blind reader."


class PromptRecorder(FakeCaptioner):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        self.prompts += [r.prompt for r in batch]
        return super().caption(batch)


def _roots_toml(*roots: tuple[Path, str]) -> str:
    return "".join(f'[[watch]]\npath = "{path}"\n{extra}\n' for path, extra in roots)


def test_sighup_style_reload_adds_a_root_and_changes_a_prompt_with_the_model_loaded_once(
    tmp_path: Path, path_notify_socket: NotifyReceiver
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    config = write_config(tmp_path, [old])
    loads: list[object] = []
    captioner = PromptRecorder()

    def factory(settings: object) -> PromptRecorder:
        loads.append(settings)
        return captioner

    settings = load_settings(config)
    with running_daemon(settings, factory=factory, settings_loader=lambda: load_settings(config)) as daemon:
        write_unique_png(old / "before.png", 1)
        wait_for(lambda: is_settled(daemon) and (old / "before.txt").exists(), 30, "a caption before the reload")
        path_notify_socket.drain(0.2)

        base = config.read_text().split("[[watch]]")[0].replace("[scheduler]\n", "[scheduler]\nmax_attempts = 5\n")
        config.write_text(
            base
            + _roots_toml((old, f'prompt = "{NEW_PROMPT}"\nprefix = "alt: "'), (new, ""))
            + "[model]\nmax_new_tokens = 7\n"  # needs a restart: named, not applied
        )
        daemon.request_reload()
        wait_for(lambda: len(daemon.settings.watch) == 2, 30, "the reload")

        write_unique_png(old / "after.png", 2)
        write_unique_png(new / "fresh.png", 3)
        wait_for(
            lambda: is_settled(daemon) and (old / "after.txt").exists() and (new / "fresh.txt").exists(),
            30,
            "captions after the reload",
        )
        assert (old / "after.txt").read_text().startswith("alt: ")
        assert not (old / "before.txt").read_text().startswith("alt: ")
        assert captioner.prompts[0] != NEW_PROMPT and NEW_PROMPT in captioner.prompts
        assert daemon.settings.model.max_new_tokens == settings.model.max_new_tokens
        assert daemon.store.max_attempts == 5
        assert len(loads) == 1
        messages = path_notify_socket.drain(1.0)
        reloading = next(i for i, m in enumerate(messages) if m.get("RELOADING") == "1")
        assert int(messages[reloading]["MONOTONIC_USEC"]) > 0
        assert any(m.get("READY") == "1" for m in messages[reloading + 1 :])

        # An invalid file changes nothing; the daemon carries on.
        config.write_text(base + '[[watch]]\ncolour = "blue"\n')
        assert daemon.reload() is False
        assert [r.path for r in daemon.settings.watch] == [old, new]
        config.write_text(base + _roots_toml((old, ""), (new, ""), (tmp_path / "missing", "")))
        assert daemon.reload() is False  # a new root must pass the start-up check
        assert daemon.is_ready()
    assert len(loads) == 1


def test_restart_only_settings_are_named_and_kept(tmp_path: Path) -> None:
    config = write_config(tmp_path, [tmp_path])
    old = load_settings(config)
    config.write_text(
        config.read_text().replace("[scheduler]\n", "[scheduler]\ndecode_workers = 7\ninteractive_slots = 3\n")
        + '[model]\nmax_new_tokens = 9\n[sidecar]\nextension = ".caption"\nexisting = "only-missing"\n'
        + "[fetch]\nmax_redirects = 1\n"
    )
    new = load_settings(config)
    assert restart_only_changes(old, new) == ["model.max_new_tokens", "scheduler.decode_workers", "sidecar.extension"]
    live = live_settings(old, new)
    assert live.model == old.model and live.sidecar.extension == old.sidecar.extension
    assert live.scheduler.decode_workers == old.scheduler.decode_workers
    assert live.scheduler.interactive_slots == 3
    assert live.sidecar.existing == "only-missing" and live.fetch.max_redirects == 1


@pytest.mark.parametrize(
    "env",
    [{"INVOCATION_ID": "0123456789abcdef"}, {"FAKE_RELOAD_ON_HUP": "1"}],
    ids=["under-systemd", "reload-on-hup"],
)
def test_sighup_reloads_a_daemon_process_instead_of_killing_it(tmp_path: Path, env: dict[str, str]) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    config = write_config(tmp_path, [old])
    proc = spawn_fake_daemon(config, tmp_path / "record", tmp_path / "daemon.log", env)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock") or proc.poll() is not None, 60, "the daemon")
        assert proc.poll() is None
        config.write_text(config.read_text() + _roots_toml((new, "")))
        os.kill(proc.pid, signal.SIGHUP)
        write_unique_png(new / "fresh.png", 1)
        wait_for(lambda: (new / "fresh.txt").exists() or proc.poll() is not None, 30, "a caption in the new root")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
        assert (new / "fresh.txt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
    assert not (tmp_path / "ctl.sock").exists()


def test_sighup_stops_a_foreground_run_outside_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed terminal must not leave a daemon holding the GPU with nobody to stop it."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    config = write_config(tmp_path, [tmp_path])
    proc = spawn_fake_daemon(config, tmp_path / "record", tmp_path / "daemon.log")
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock") or proc.poll() is not None, 60, "the daemon")
        os.kill(proc.pid, signal.SIGHUP)
        rc = proc.wait(45)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert "`phicapd run --reload-on-hup` reloads instead" in (tmp_path / "daemon.log").read_text()
    assert not (tmp_path / "ctl.sock").exists()


def test_run_takes_reload_on_hup() -> None:
    from phicapd.cli.daemon import _parser

    assert _parser().parse_args(["run", "--reload-on-hup"]).reload_on_hup is True
    assert _parser().parse_args(["run"]).reload_on_hup is None  # decided by started_by_systemd()


def test_status_shows_a_refused_reload_until_one_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from phicapd.cli.ctl import main as phicapctl

    config = write_config(tmp_path, [tmp_path])
    good = config.read_text()
    settings = load_settings(config)
    socket = str(settings.control.socket)
    with running_daemon(settings, settings_loader=lambda: load_settings(config)) as daemon:
        assert daemon.api.status()["config"] == {"reload_refused": None}
        config.write_text(good + "[model]\nnum_crops = 0\n")
        assert daemon.reload() is False
        refused = daemon.api.status()["config"]["reload_refused"]
        assert "model.num_crops" in refused["reason"] and refused["at"] > 0
        capsys.readouterr()
        assert phicapctl(["--socket", socket, "status"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert re.fullmatch(
            r"config: reload refused at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: invalid configuration in .*", first
        )
        config.write_text(good)
        assert daemon.reload() is True
        assert daemon.api.status()["config"] == {"reload_refused": None}
        assert phicapctl(["--socket", socket, "status"]) == 0
        assert "reload refused" not in capsys.readouterr().out
