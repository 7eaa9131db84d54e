"""GET /v1/sidecar and how phicapctl uses it: the watch root's naming inputs and ``existing``
policy per directory, the fallback for a daemon without the endpoint, and images the root's
patterns leave out."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from phicapd import image_types
from phicapd.cli.ctl import main
from phicapd.config import ControlSettings
from phicapd.control.client import ControlClient, RequestRejected
from phicapd.control.server import ControlServer
from tests.control.fakes import GOOD_MAGIC, FakeBackend


def ctl(settings: ControlSettings, *args: str) -> int:
    return main(["--socket", str(settings.socket), *args])


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GOOD_MAGIC + path.name.encode())
    return path


def fresh_sidecar(path: Path, text: str = "hand-edited\n") -> Path:
    path.write_text(text)
    later = time.time() + 10
    os.utime(path, (later, later))
    return path


@pytest.fixture
def client(server: ControlServer, settings: ControlSettings) -> ControlClient:
    return ControlClient(settings.socket)


def test_endpoint_reports_the_root_and_its_policy(client: ControlClient, backend: FakeBackend) -> None:
    backend.naming_root = {"path": "/srv/in", "recursive": False, "include": ["*.png"], "ignore": ["raw/*"]}
    backend.root_existing = "overwrite"
    policy = client.sidecar_policy("/srv/in/a.png")
    assert policy is not None and policy.root is not None
    assert (policy.existing, policy.extension) == ("overwrite", ".txt")
    assert (policy.root.path, policy.root.recursive, policy.root.include, policy.root.ignore) == (
        "/srv/in",
        False,
        ["*.png"],
        ["raw/*"],
    )
    outside = client.sidecar_policy("/elsewhere/a.png")
    assert outside is not None and outside.root is None and outside.existing == "skip"
    assert backend.policy_paths == [Path("/srv/in/a.png"), Path("/elsewhere/a.png")]


@pytest.mark.parametrize("query", [{}, {"path": "in/a.png"}, {"path": "/srv/../etc/a.png"}, {"path": ""}])
def test_endpoint_wants_a_plain_absolute_path(client: ControlClient, backend: FakeBackend, query: dict) -> None:
    with pytest.raises(RequestRejected) as err:
        client.request("GET", "/v1/sidecar", query=query)
    assert err.value.code == "bad_request"
    assert backend.policy_paths == []


def test_ctl_names_by_the_roots_patterns_and_asks_once_per_directory(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys
) -> None:
    real = tmp_path / "real"
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    backend.naming_root = {"path": str(real), "recursive": True, "include": ["*.png"], "ignore": []}
    image(real / "photo.jpg")  # not one of the root's images
    photos = [image(real / "photo.png"), image(real / "other.png")]

    assert ctl(settings, "caption-file", *(str(tmp_path / "alias" / p.name) for p in photos)) == 0

    capsys.readouterr()
    # photo.jpg sorts first, but the root does not caption it, so photo.png keeps photo.txt.
    assert (real / "photo.txt").read_text() == "caption of photo.png (13 bytes)\n"
    assert (real / "other.txt").exists() and not (real / "photo.png.txt").exists()
    assert backend.policy_paths == [real / "photo.png"]  # resolved, once for the directory


def test_ctl_never_takes_the_name_of_a_root_images_sidecar(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys
) -> None:
    backend.naming_root = {"path": str(tmp_path), "recursive": True, "include": ["*.png"], "ignore": []}
    jpg = image(tmp_path / "photo.jpg")  # left out by the root's patterns, but captioned on request
    image(tmp_path / "photo.png")  # the watcher gives photo.txt to this one

    assert ctl(settings, "caption-file", str(jpg)) == 0

    capsys.readouterr()
    assert (tmp_path / "photo.jpg.txt").read_text() == "caption of photo.jpg (13 bytes)\n"
    assert not (tmp_path / "photo.txt").exists()


@pytest.mark.parametrize(("global_existing", "root_existing"), [("skip", "overwrite"), ("overwrite", "skip")])
def test_ctl_obeys_the_roots_existing_policy(
    settings: ControlSettings,
    server: ControlServer,
    backend: FakeBackend,
    tmp_path: Path,
    capsys,
    global_existing: str,
    root_existing: str,
) -> None:
    watched, other = tmp_path / "watched", tmp_path / "other"
    backend.existing = global_existing
    backend.naming_root = {"path": str(watched), "recursive": True, "include": ["*.png"], "ignore": []}
    backend.root_existing = root_existing
    photos = [image(watched / "a.png"), image(other / "a.png")]
    sidecars = [fresh_sidecar(watched / "a.txt"), fresh_sidecar(other / "a.txt")]

    assert ctl(settings, "caption-file", *map(str, photos)) == 0

    capsys.readouterr()
    kept = [s.read_text() == "hand-edited\n" for s in sidecars]
    assert kept == [root_existing == "skip", global_existing == "skip"]


def older_sidecar(path: Path, text: str = "hand-edited\n") -> Path:
    """A sidecar an hour older than the image beside it: stale under ``skip``."""
    path.write_text(text)
    then = time.time() - 3600
    os.utime(path, (then, then))
    return path


@pytest.mark.parametrize("where", ["global", "root"])
def test_only_missing_keeps_an_older_sidecar_unless_forced(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys, where: str
) -> None:
    if where == "global":
        backend.existing = "only-missing"
    else:
        backend.naming_root = {"path": str(tmp_path), "recursive": True, "include": ["*.png"], "ignore": []}
        backend.root_existing = "only-missing"
    edited, bare = image(tmp_path / "edited.png"), image(tmp_path / "bare.png")
    sidecar = older_sidecar(tmp_path / "edited.txt")

    assert ctl(settings, "caption-file", str(edited), str(bare)) == 0

    assert "edited.png: skipped" in capsys.readouterr().err
    assert sidecar.read_text() == "hand-edited\n"  # older than its image, and kept
    assert (tmp_path / "bare.txt").read_text() == "caption of bare.png (12 bytes)\n"
    assert [name for name, _ in backend.received] == ["bare.png"]

    assert ctl(settings, "caption-file", "--force", str(edited)) == 0

    capsys.readouterr()
    assert sidecar.read_text() == "caption of edited.png (14 bytes)\n"


def test_only_missing_via_the_status_fallback(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys
) -> None:
    server._router._routes.pop("/v1/sidecar")  # the global policy comes from /v1/status
    backend.existing = "only-missing"
    edited = image(tmp_path / "edited.png")
    sidecar = older_sidecar(tmp_path / "edited.txt")

    assert ctl(settings, "caption-dir", str(tmp_path)) == 0

    capsys.readouterr()
    assert sidecar.read_text() == "hand-edited\n" and backend.received == []
    assert edited.exists()


def test_a_daemon_without_the_endpoint_gets_the_global_policy(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys
) -> None:
    server._router._routes.pop("/v1/sidecar")  # as a daemon from before it answers: 404
    backend.existing = "overwrite"
    jpg, png = image(tmp_path / "a.jpg"), image(tmp_path / "a.png")
    sidecar = fresh_sidecar(tmp_path / "a.txt")

    assert ctl(settings, "caption-file", str(jpg), str(png)) == 0

    capsys.readouterr()
    assert sidecar.read_text() == "caption of a.jpg (9 bytes)\n"  # overwritten: the global policy
    assert (tmp_path / "a.png.txt").exists()  # the default extensions name the siblings
    assert backend.policy_paths == []


def test_caption_dir_picks_the_files_the_roots_patterns_pick(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(image_types, "heif_available", lambda: False)  # the default takes no HEIC
    watched, other = tmp_path / "watched", tmp_path / "other"
    backend.naming_root = {"path": str(watched), "recursive": True, "include": ["*.png", "*.heic"], "ignore": ["raw/*"]}
    image(watched / "a.png")
    image(watched / "b.HEIC")  # not a default extension, but this root captions it
    image(watched / "c.jpg")  # a default extension this root leaves out
    image(watched / "raw" / "d.png")  # ignored by the root
    image(watched / "sub" / "e.png")
    image(other / "f.jpg")  # unwatched: the default extensions decide
    image(other / "g.heic")

    assert ctl(settings, "caption-dir", "--recursive", "--stdout", str(watched)) == 0
    assert ctl(settings, "caption-dir", "--stdout", str(other)) == 0

    capsys.readouterr()
    assert sorted(name for name, _ in backend.received) == ["a.png", "b.HEIC", "e.png", "f.jpg"]


def test_caption_dir_without_the_endpoint_uses_the_default_extensions(
    settings: ControlSettings, server: ControlServer, backend: FakeBackend, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(image_types, "heif_available", lambda: False)  # the default takes no HEIC
    server._router._routes.pop("/v1/sidecar")
    image(tmp_path / "a.jpg")
    image(tmp_path / "b.heic")

    assert ctl(settings, "caption-dir", str(tmp_path)) == 0

    capsys.readouterr()
    assert [name for name, _ in backend.received] == ["a.jpg"]
    assert (tmp_path / "a.txt").exists()
