"""phicapctl caption-file under a watched root names and keeps the sidecar exactly as the watcher
does: the root's include/ignore patterns decide which same-stem siblings count for the naming
rule, and the root's ``existing`` policy (not the global one) decides whether an up-to-date sidecar
is kept. Real daemon, fake model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from phicapd.control.client import ControlClient
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import write_unique_png


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), "caption-file", *args])


def _root_config(root: Path, lines: str, global_existing: str = "skip") -> str:
    return f'[sidecar]\nexisting = "{global_existing}"\n[[watch]]\npath = "{root}"\n{lines}\n'


def _sidecars(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.suffix == ".txt"}


@pytest.mark.parametrize(
    ("root_lines", "sibling", "expected"),
    [
        # The root captions only PNGs: photo.jpg is no sibling for it, so photo.png keeps photo.txt
        # (a fixed list of image extensions would count photo.jpg, which sorts first).
        ('include = ["*.png"]', "photo.jpg", "photo.txt"),
        # The same through an ignore pattern.
        ('ignore = ["*.jpg"]', "photo.jpg", "photo.txt"),
        # The root also captions .dng files, which sort first: photo.png takes its full name.
        ('include = ["*.png", "*.dng"]', "photo.dng", "photo.png.txt"),
    ],
)
def test_sidecar_name_follows_the_roots_patterns(
    tmp_path: Path, capsys, root_lines: str, sibling: str, expected: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [], extra=_root_config(root, root_lines))
    with running_daemon(settings):
        (root / sibling).write_bytes(b"not decodable, and the root may not even caption it")
        photo = root / "photo.png"
        write_unique_png(photo, 1)
        by_watcher = root / expected
        wait_for(by_watcher.exists, 30, f"the watcher's sidecar {expected}")
        content = by_watcher.read_bytes()
        by_watcher.unlink()

        assert _ctl(settings.control.socket, "--json", str(photo)) == 0
        capsys.readouterr()
        assert _sidecars(root) == {expected}
        assert by_watcher.read_bytes() == content


def test_a_symlinked_root_names_sidecars_by_its_patterns(tmp_path: Path, capsys) -> None:
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    settings = settings_for(tmp_path, [], extra=_root_config(alias, 'include = ["*.png", "*.dng"]'))
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        policy = ControlClient(settings.control.socket).sidecar_policy(str(real / "photo.png"))
        assert policy is not None and policy.root is not None
        assert policy.root.path == str(real)  # the form the (resolved) path lies under
        (real / "photo.dng").write_bytes(b"raw")
        write_unique_png(real / "photo.png", 2)
        assert _ctl(settings.control.socket, "--stdout", str(alias / "photo.png")) == 0
        assert _ctl(settings.control.socket, str(alias / "photo.png")) == 0
        capsys.readouterr()
    assert _sidecars(real) == {"photo.png.txt"}


@pytest.mark.parametrize(
    ("global_existing", "root_existing", "kept"),
    [("skip", "overwrite", False), ("overwrite", "skip", True)],
)
def test_the_roots_existing_policy_wins_over_the_global_one(
    tmp_path: Path, capsys, global_existing: str, root_existing: str, kept: bool
) -> None:
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    settings = settings_for(
        tmp_path, [], extra=_root_config(root, f'existing = "{root_existing}"', global_existing=global_existing)
    )
    with running_daemon(settings) as daemon:
        daemon.api.pause()  # the watcher stays out of it
        for directory, keep in ((root, kept), (elsewhere, not kept)):  # elsewhere: the global policy
            photo = directory / "photo.png"
            write_unique_png(photo, 3)
            sidecar = directory / "photo.txt"
            sidecar.write_text("hand-edited\n")
            later = photo.stat().st_mtime + 10
            os.utime(sidecar, (later, later))  # newer than its image: up to date

            assert _ctl(settings.control.socket, str(photo)) == 0

            err = capsys.readouterr().err
            if keep:
                assert sidecar.read_text() == "hand-edited\n", directory
                assert "skipped" in err
            else:
                assert sidecar.read_text().startswith("A 8x8 test image"), directory
