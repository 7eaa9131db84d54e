"""phicapctl caption-file writes the per-image formats the daemon would (``txt``, ``json``), the
JSON with the daemon's provenance, each file judged by the policy on its own. Real daemon, fake model."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from phicapd.outputs.formats.jsonl import read_manifest
from tests.core.test_formats import JSON_KEYS
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), "caption-file", *args])


def _config(root: Path, root_lines: str, sidecar_lines: str = "") -> str:
    return f'[sidecar]\n{sidecar_lines}\n[[watch]]\npath = "{root}"\n{root_lines}\n'


def test_caption_file_under_a_root_writes_its_formats_with_provenance(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    lines = 'formats = ["txt", "json", "jsonl"]\nprompt = "Root prompt."\nprefix = "P: "'
    settings = settings_for(tmp_path, [], extra=_config(root, lines))
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()  # the watcher must not be the one that writes them
        photo = root / "photo.png"
        write_unique_png(photo, 1)
        assert _ctl(settings.control.socket, str(photo)) == 0
        # The manifest is the daemon's writer's: it merges the caption phicapctl reports.
        wait_for(lambda: read_manifest(root) != {}, 10, "the daemon's manifest")
    capsys.readouterr()
    text = (root / "photo.txt").read_text()
    document = json.loads((root / "photo.json").read_text())
    assert set(document) == JSON_KEYS
    assert document["caption"] + "\n" == text and text.startswith("P: A 8x8 test image ")
    assert (document["model"], document["revision"], document["backend"]) == ("fake", "test", "native")
    assert document["prompt"] == "Root prompt."
    assert document["generation"]["max_new_tokens"] == settings.model.max_new_tokens
    assert document["image_sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert read_manifest(root) == {"photo.png": document["caption"]}
    assert sum(fake.calls.values()) == 1


def test_caption_file_outside_every_root_uses_the_sidecar_formats(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = settings_for(tmp_path, [], extra='[sidecar]\nformats = ["json"]\n')
    with running_daemon(settings):
        photo = elsewhere / "photo.png"
        write_unique_png(photo, 2)
        assert _ctl(settings.control.socket, str(photo)) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["photo.json", "photo.png"]
    assert json.loads((elsewhere / "photo.json").read_text())["prompt"] == settings.model.prompt
    capsys.readouterr()


def test_caption_file_writes_only_the_format_the_policy_does_not_keep(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [], extra=_config(root, 'formats = ["txt", "json"]'))
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        photo = root / "photo.png"
        write_unique_png(photo, 3)
        old = time.time() - 60
        os.utime(photo, (old, old))
        (root / "photo.txt").write_text("my own words\n")  # newer than the image: skip keeps it
        assert _ctl(settings.control.socket, str(photo)) == 0
        assert (root / "photo.txt").read_text() == "my own words\n"
        assert json.loads((root / "photo.json").read_text())["caption"].startswith("A 8x8 test image ")
        # Both kept now: nothing is sent at all.
        assert _ctl(settings.control.socket, "--json", str(photo)) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["state"] == "skipped"


@pytest.mark.parametrize("force", [False, True])
def test_caption_file_force_replaces_every_format(tmp_path: Path, capsys, force: bool) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [], extra=_config(root, 'formats = ["txt", "json"]\nexisting = "only-missing"'))
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        photo = root / "photo.png"
        write_unique_png(photo, 4)
        (root / "photo.txt").write_text("mine\n")
        (root / "photo.json").write_text('{"caption": "mine"}\n')
        assert _ctl(settings.control.socket, *(["--force"] if force else []), str(photo)) == 0
    capsys.readouterr()
    replaced = (root / "photo.txt").read_text() != "mine\n"
    assert replaced == force
    assert (json.loads((root / "photo.json").read_text())["caption"] != "mine") == force


def test_provenance_is_only_in_replies_that_ask_for_it_and_sidecar_reports_formats(tmp_path: Path) -> None:
    from phicapd.control.client import ControlClient

    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [], extra=_config(root, 'formats = ["json", "xmp"]'))
    photo = root / "photo.png"
    write_unique_png(photo, 5)
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        client = ControlClient(settings.control.socket, timeout=30)
        policy = client.sidecar_policy(str(photo))
        assert policy is not None and policy.formats == ["json", "xmp"]
        outside = client.sidecar_policy(str(tmp_path / "x.png"))
        assert outside is not None and outside.formats == ["txt"]
        data = photo.read_bytes()
        plain = client.request("POST", "/v1/caption", body=data, content_type="application/octet-stream")
        assert "provenance" not in json.loads(plain.body)
        asked = client.caption_bytes(data, name="photo.png", path=str(photo), provenance=True)
        assert asked.provenance is not None and set(asked.provenance) == {
            "model",
            "revision",
            "backend",
            "prompt",
            "generation",
            "settings_key",  # under a root: what phicapctl reports back with the caption
        }
