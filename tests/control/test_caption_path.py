"""The optional ``path`` of POST /v1/caption: what phicapctl sends, what the server accepts, and the
``root`` field of the reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from phicapd.config import ControlSettings
from phicapd.control.client import ControlClient, RequestRejected
from phicapd.control.server import ControlServer
from tests.control.fakes import GOOD_MAGIC, FakeBackend


@pytest.fixture
def client(server: ControlServer, settings: ControlSettings) -> ControlClient:
    return ControlClient(settings.socket)


def test_caption_file_sends_the_path_with_its_directory_resolved(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, monkeypatch, capsys
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    (real / "p.jpg").write_bytes(GOOD_MAGIC + b"p")
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(GOOD_MAGIC + b"e")
    (real / "ln.jpg").symlink_to(elsewhere)  # its sidecar goes beside the link, so the link's directory counts
    monkeypatch.chdir(tmp_path)

    assert main(["--socket", str(settings.socket), "caption-file", "-j", "1", "alias/p.jpg", "alias/ln.jpg"]) == 0

    capsys.readouterr()
    assert sorted(map(str, backend.paths)) == [str(real / "ln.jpg"), str(real / "p.jpg")]
    assert (real / "ln.txt").exists() and not (tmp_path / "elsewhere.txt").exists()


def test_reply_names_the_root_only_when_one_applied(client: ControlClient, backend: FakeBackend) -> None:
    backend.root = "/srv/photos"

    def reply(query: dict[str, str]) -> dict[str, object]:
        return client.request("POST", "/v1/caption", body=GOOD_MAGIC, query={"name": "x.jpg", **query}).json()

    assert reply({"path": "/srv/photos/x.jpg"})["root"] == "/srv/photos"
    # Without one the field is left out, so clients that predate it (extra="forbid") still parse replies.
    assert "root" not in reply({})
    assert (
        "root"
        not in client.request("POST", "/v1/caption-url", body=json.dumps({"url": "https://e.x/a.jpg"}).encode()).json()
    )
    assert client.caption_bytes(GOOD_MAGIC, name="x.jpg", path="/srv/photos/x.jpg").root == "/srv/photos"


@pytest.mark.parametrize("path", ["photos/x.jpg", "/srv/photos/../etc/x.jpg", "/srv/\0x.jpg", ""])
def test_path_must_be_absolute_and_plain(client: ControlClient, backend: FakeBackend, path: str) -> None:
    with pytest.raises(RequestRejected) as err:
        client.request("POST", "/v1/caption", body=GOOD_MAGIC, query={"name": "x.jpg", "path": path})
    assert err.value.code == "bad_request"
    assert backend.received == []
