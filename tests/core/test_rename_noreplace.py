"""``safe_files.rename_noreplace``: an output takes its new name atomically, never over a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from phicapd.outputs import safe_files


@pytest.fixture(params=["renameat2", "link", "copy"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way the rename can go: renameat2, a filesystem without it (hard link, unlink), and
    one across filesystems (a copy linked in, then the source removed)."""
    if request.param != "renameat2":
        monkeypatch.setattr(safe_files, "_renameat2", lambda: None)
    if request.param == "copy":
        link = os.link

        def cross_device(source: object, target: object, **kw: object) -> None:
            if not Path(str(source)).name.startswith("."):  # the copy's temp file links in
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            link(source, target, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "link", cross_device)
    return str(request.param)


def test_the_file_takes_the_new_name_and_leaves_nothing_behind(tmp_path: Path, way: str) -> None:
    (tmp_path / "horse.txt").write_text("edited\n")
    safe_files.rename_noreplace(tmp_path / "horse.txt", tmp_path / "my horse.txt")
    assert sorted(os.listdir(tmp_path)) == ["my horse.txt"]
    assert (tmp_path / "my horse.txt").read_text() == "edited\n"


def test_a_file_at_the_new_name_is_never_replaced(tmp_path: Path, way: str) -> None:
    (tmp_path / "horse.txt").write_text("ours\n")
    (tmp_path / "cow.txt").write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        safe_files.rename_noreplace(tmp_path / "horse.txt", tmp_path / "cow.txt")
    assert (tmp_path / "cow.txt").read_text() == "someone else's\n"
    assert (tmp_path / "horse.txt").read_text() == "ours\n"
    assert sorted(os.listdir(tmp_path)) == ["cow.txt", "horse.txt"]
