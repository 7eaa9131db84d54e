"""Staleness: every caption records its settings key; `phicapctl stale` lists the captions made
with other settings than their root's current ones, `recaption --stale` redoes exactly those,
and captions edited by hand are never replaced unless forced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phicapd.cli import ctl
from phicapd.control.client import ControlClient, ControlClientError
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png


def _roots(tmp_path: Path) -> tuple[Path, Path]:
    other, root = tmp_path / "other", tmp_path / "photos"
    other.mkdir()
    root.mkdir()
    for i in range(2):
        write_unique_png(other / f"o{i}.png", 100 + i)
    for i in range(4):
        write_unique_png(root / f"p{i}.png", i)
    return other, root


def _settings(tmp_path: Path, roots: tuple[Path, Path], prompt: str, more: str = ""):  # type: ignore[no-untyped-def]
    # The extra lines land in the last [[watch]] table: the "photos" root.
    return settings_for(tmp_path, list(roots), extra=f'prompt = "{prompt}"\nformats = ["txt", "json"]\n{more}')


def _first_run(tmp_path: Path, roots: tuple[Path, Path], fake: FakeCaptioner, more: str = "") -> None:
    with running_daemon(_settings(tmp_path, roots, "Describe it.", more), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 6, 30, "six captions")
    assert sum(fake.calls.values()) == 6


def test_changed_prompt_lists_exactly_that_roots_captions_and_recaption_redoes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = _roots(tmp_path)
    other, root = roots
    fake = FakeCaptioner()
    _first_run(tmp_path, roots, fake)
    (root / "p3.txt").write_text("my own words\n")  # edited by hand after the daemon wrote it
    untouched = (other / "o0.txt").read_text()
    with running_daemon(_settings(tmp_path, roots, "Write alt text."), fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the start-up scans")
        assert sum(fake.calls.values()) == 6  # a new prompt alone redoes nothing (restale = "manual")
        client = ControlClient(tmp_path / "ctl.sock", timeout=10)
        everywhere = client.stale()
        assert sorted(e.path for e in everywhere.stale) == [str(root / f"p{i}.png") for i in range(3)]
        assert [e.path for e in everywhere.edited] == [str(root / "p3.png")]
        assert everywhere.stale[0].prompt == "Describe it." and everywhere.stale[0].model == "fake@test"
        assert client.stale(str(root)).model_dump() == everywhere.model_dump()
        assert client.stale(str(other)).stale == []
        # The command line, from a relative DIR.
        sock = str(tmp_path / "ctl.sock")
        assert ctl.main(["--socket", sock, "stale", str(root)]) == 0
        out, err = capsys.readouterr()
        assert out.split() == [str(root / f"p{i}.png") for i in range(3)]
        assert "1 more edited" in err
        assert ctl.main(["--socket", sock, "recaption", "--stale", str(root)]) == 0
        assert capsys.readouterr().out.strip() == "re-queued 3 (1 edited by hand kept)"
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 9, 30, "three new captions")
        assert client.stale().stale == []
        assert [e.path for e in client.stale().edited] == [str(root / "p3.png")]
    assert sum(fake.calls.values()) == 9
    assert (root / "p3.txt").read_text() == "my own words\n"
    assert (other / "o0.txt").read_text() == untouched
    for i in range(3):
        assert json.loads((root / f"p{i}.json").read_text())["prompt"] == "Write alt text."


def test_recaption_force_replaces_edited_captions_too(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    root = roots[1]
    fake = FakeCaptioner()
    _first_run(tmp_path, roots, fake)
    (root / "p0.txt").write_text("mine\n")
    with running_daemon(_settings(tmp_path, roots, "Write alt text."), fake) as daemon:
        client = ControlClient(tmp_path / "ctl.sock", timeout=10)
        reply = client.recaption_stale(str(root), force=True)
        assert (reply.requeued, reply.edited_kept) == (4, 0)
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 10, 30, "four new captions")
    assert (root / "p0.txt").read_text().startswith("A 8x8 test image ")


def test_restale_auto_redoes_stale_captions_at_start_but_not_edited_ones(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    root = roots[1]
    fake = FakeCaptioner()
    _first_run(tmp_path, roots, fake, 'restale = "auto"\n')
    (root / "p1.json").write_text('{"caption": "edited in a tool"}\n')
    with running_daemon(_settings(tmp_path, roots, "Write alt text.", 'restale = "auto"\n'), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 9, 30, "three automatic captions")
        assert [e.path for e in ControlClient(tmp_path / "ctl.sock", timeout=10).stale().edited] == [
            str(root / "p1.png")
        ]
    assert sum(fake.calls.values()) == 9
    assert json.loads((root / "p1.json").read_text()) == {"caption": "edited in a tool"}


def test_stale_outside_every_root_and_bad_requests_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    with running_daemon(settings_for(tmp_path, [root]), FakeCaptioner()):
        client = ControlClient(tmp_path / "ctl.sock", timeout=10)
        with pytest.raises(ControlClientError) as e:
            client.stale(str(tmp_path / "elsewhere"))
        assert e.value.code == "not_watched" and "under no watch root" in str(e.value)
        with pytest.raises(ControlClientError) as e:
            client.stale("relative/dir")
        assert e.value.code == "bad_request"
        for body, says in ((b'{"stale": false}', b"stale: true"), (b"{}", b"stale")):
            resp = client.request("POST", "/v1/recaption", body=body, content_type="application/json", accept=(400,))
            assert resp.status == 400 and says in resp.body


def test_recaption_without_stale_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--socket", "/nonexistent/ctl.sock", "recaption"]) == 64
    assert "--stale" in capsys.readouterr().err


def test_restale_auto_redoes_stale_captions_after_a_reload(tmp_path: Path) -> None:
    from phicapd.config import load_settings
    from tests.support.daemon import write_config

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        write_unique_png(root / f"p{i}.png", i)
    lines = 'restale = "auto"\nformats = ["txt", "json"]\n'
    config = write_config(tmp_path, [root], extra=lines + 'prompt = "Describe it."\n')
    fake = FakeCaptioner()
    with running_daemon(load_settings(config), fake, settings_loader=lambda: load_settings(config)) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
        (root / "p0.txt").write_text("mine\n")
        write_config(tmp_path, [root], extra=lines + 'prompt = "Write alt text."\n')
        assert daemon.reload() is True
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 5, 30, "two automatic captions")
    assert (root / "p0.txt").read_text() == "mine\n"
    assert [json.loads((root / f"p{i}.json").read_text())["prompt"] for i in (1, 2)] == ["Write alt text."] * 2
