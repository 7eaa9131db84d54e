"""An in-place metadata edit never loses the owner's bytes: an image (or XMP sidecar) replaced,
rewritten or deleted while its temp copy is edited is left exactly as its owner made it (or left
deleted), with no temp file behind; through the daemon, the journal never records the old caption
as done, and the new bytes get a caption of their own.

Deterministic: ``metadata.EDIT_HOOKS`` plays the owner at each named step of the edit."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phicapd.pipeline import metadata
from phicapd.pipeline.jobs import Fingerprint
from tests.support.fakes import write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
DATA = Path(__file__).resolve().parents[1] / "data" / "xmp"
STEPS = ("copied", "edited", "before_rename")


@pytest.fixture
def hooks() -> Iterator[list[Callable[[str, Path], None]]]:
    yield metadata.EDIT_HOOKS
    metadata.EDIT_HOOKS.clear()


def _rewrite(path: Path, data: bytes) -> None:
    """``cp new photo``: the same inode, truncated and written again."""
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)


def _replace(path: Path, data: bytes) -> None:
    """A save that writes a new file and renames it over the old one (a new inode)."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def _retouch(path: Path, data: bytes) -> None:
    """Same size, rewritten in place, the old mtime put back (``cp -p``): only the ctime tells."""
    st = path.stat()
    assert len(data) == st.st_size
    _rewrite(path, data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


OWNERS: dict[str, Callable[[Path, bytes], None]] = {
    "rewrite": _rewrite,
    "replace": _replace,
    "retouch": _retouch,
    "delete": lambda path, _data: path.unlink(),
}


def _acting_at(step: str, act: Callable[[], None]) -> Callable[[str, Path], None]:
    """A hook that plays the owner once, at ``step``."""
    done: list[bool] = []

    def hook(name: str, _path: Path) -> None:
        if name == step and not done:
            done.append(True)
            act()

    return hook


def _flip_last_pixel_byte(data: bytes) -> bytes:
    """The same JPEG with one byte of its entropy-coded data changed (same size)."""
    at = len(data) - 10  # before the EOI marker, inside the scan
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("owner", sorted(OWNERS))
@pytest.mark.parametrize("step", STEPS)
def test_an_image_changed_during_its_embed_keeps_the_owners_bytes(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]], step: str, owner: str
) -> None:
    image = tmp_path / "photo.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", image)
    old = image.read_bytes()
    new = _flip_last_pixel_byte(old) if owner == "retouch" else (IMAGES / "hubble_deep_field.jpg").read_bytes()
    hooks.append(_acting_at(step, lambda: OWNERS[owner](image, new)))
    with pytest.raises(metadata.FileChanged, match=str(image)):
        metadata.embed_caption(image, "the old picture's caption")
    if owner == "delete":
        assert not image.exists(), "a deleted image was brought back"
        assert list(tmp_path.iterdir()) == []
    else:
        assert image.read_bytes() == new  # byte for byte, no caption of ours in it
        assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]  # no temp file left


def test_an_image_that_is_not_the_version_captioned_is_not_written(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]]
) -> None:
    image = tmp_path / "photo.png"
    write_unique_png(image, 1)
    st = image.stat()
    captioned = Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)
    new = (IMAGES / "horse.png").read_bytes()
    hooks.append(_acting_at("start", lambda: _replace(image, new)))  # between the caption and its write
    with pytest.raises(metadata.FileChanged):
        metadata.embed_caption(image, "a caption of the old picture", captioned)
    assert image.read_bytes() == new and [p.name for p in tmp_path.iterdir()] == ["photo.png"]


def test_an_undisturbed_embed_writes_and_reports_what_it_put_in_place(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]]
) -> None:
    image = tmp_path / "photo.png"
    write_unique_png(image, 1)
    st = image.stat()
    steps: list[str] = []
    hooks.append(lambda name, _path: steps.append(name))
    placed = metadata.embed_caption(image, "a caption", Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino))
    assert steps == ["start", "copied", "edited", "before_rename"]
    after = image.stat()
    assert placed == Fingerprint(after.st_size, after.st_mtime_ns, after.st_ino)
    assert after.st_mtime_ns == st.st_mtime_ns and metadata.read_description(image) == "a caption"


def _person_edits(sidecar: Path) -> None:
    """A person rates the image 2 (lightroom.xmp says 5) in their editor, which rewrites the sidecar."""
    edited = pyexiv2.Image(str(sidecar))
    try:
        edited.modify_xmp({"Xmp.xmp.Rating": "2"})
    finally:
        edited.close()


@pytest.mark.parametrize("step", STEPS)
def test_a_sidecar_edited_during_the_merge_keeps_the_persons_edit(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]], step: str
) -> None:
    sidecar = tmp_path / "photo.xmp"
    shutil.copyfile(DATA / "lightroom.xmp", sidecar)
    theirs: list[bytes] = []

    def person() -> None:
        _person_edits(sidecar)
        theirs.append(sidecar.read_bytes())

    hooks.append(_acting_at(step, person))
    with pytest.raises(metadata.FileChanged):
        metadata.write_xmp_sidecar(sidecar, "ours")
    assert [sidecar.read_bytes()] == theirs  # their edit, byte for byte: ours was dropped
    assert [p.name for p in tmp_path.iterdir()] == ["photo.xmp"]


def test_a_sidecar_created_while_ours_was_made_is_kept(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]]
) -> None:
    sidecar = tmp_path / "photo.xmp"
    theirs = (DATA / "lightroom.xmp").read_bytes()
    hooks.append(_acting_at("before_rename", lambda: sidecar.write_bytes(theirs)))
    with pytest.raises(metadata.FileChanged):
        metadata.write_xmp_sidecar(sidecar, "ours")
    assert sidecar.read_bytes() == theirs and [p.name for p in tmp_path.iterdir()] == ["photo.xmp"]
