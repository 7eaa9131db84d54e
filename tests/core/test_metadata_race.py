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
from PIL import Image

from phicapd.outputs import metadata
from phicapd.pipeline.journal import Fingerprint, Journal, State
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image, write_unique_png

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
    assert (placed.inode, placed.size, placed.mtime_ns) == (after.st_ino, after.st_size, after.st_mtime_ns)
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


# -- through the daemon ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_an_image_rewritten_during_its_embed_ends_captioned_from_its_new_bytes(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]], step: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    image = root / "photo.png"
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "embed"]\n')
    fake = FakeCaptioner()
    new_picture = unique_image(2)
    staging = tmp_path / "new.png"
    new_picture.save(staging, format="PNG")
    new_bytes, new_key = staging.read_bytes(), image_key(new_picture)
    acted: list[str] = []
    seen: list[bytes] = []  # what the next embed found in place: the owner's bytes, untouched
    journal: list[tuple[State, str | None, str | None]] = []  # the job as the next embed starts
    store: list[Journal] = []

    def owner(name: str, path: Path) -> None:
        if name == step and not acted:
            acted.append(name)
            _rewrite(image, new_bytes)  # cp new.png photo.png, while our copy is edited
        elif name == "start" and acted:
            seen.append(path.read_bytes())
            job = store[0].get(image)
            assert job is not None
            journal.append((job.state, job.error_code, job.caption))

    hooks.append(owner)
    with running_daemon(settings, fake) as daemon:
        store.append(daemon.store)
        old_key = write_unique_png(image, 1, rename_in=True)

        def captioned_anew() -> bool:
            job = daemon.store.get(image)
            return job is not None and job.state is State.DONE and new_key in (job.caption or "") and is_settled(daemon)

        wait_for(captioned_anew, 30, "the new picture's caption")
        job = daemon.store.get(image)
    assert seen == [new_bytes]
    # Never done with the old picture's caption: retried for the new bytes, which the model saw.
    ((state, code, staged),) = journal
    assert state is State.RUNNING and code == "image_changed" and old_key not in (staged or "")
    assert fake.calls[old_key] == 1 and fake.calls[new_key] == 1 and sum(fake.calls.values()) == 2
    caption = (root / "photo.txt").read_text().rstrip("\n")
    assert new_key in caption and job is not None and job.caption == caption and job.attempts == 0
    with Image.open(image) as now:
        assert image_key(now.convert("RGB")) == new_key  # the new picture, not the old one back
    assert metadata.read_description(image) == caption
    assert sorted(p.name for p in root.iterdir()) == ["photo.png", "photo.txt"]


@pytest.mark.parametrize("step", STEPS)
def test_an_image_deleted_during_its_embed_stays_deleted_and_is_forgotten(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]], step: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    image = root / "photo.png"
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "embed"]\n')
    fake = FakeCaptioner()
    hooks.append(_acting_at(step, image.unlink))
    with running_daemon(settings, fake) as daemon:
        write_unique_png(image, 1, rename_in=True)
        wait_for(lambda: fake.calls and daemon.store.get(image) is None and is_settled(daemon), 30, "forgetting it")
    assert sum(fake.calls.values()) == 1
    assert list(root.iterdir()) == []  # not brought back, no caption file, no temp file


def test_a_sidecar_edited_during_the_merge_keeps_the_edit_and_gets_the_caption_after(
    tmp_path: Path, hooks: list[Callable[[str, Path], None]]
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    image = root / "photo.png"
    sidecar = root / "photo.xmp"
    shutil.copyfile(DATA / "lightroom.xmp", sidecar)  # no description yet: ours is merged into it
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "xmp"]\n')
    fake = FakeCaptioner()
    hooks.append(_acting_at("edited", lambda: _person_edits(sidecar)))
    with running_daemon(settings, fake) as daemon:
        key = write_unique_png(image, 1, rename_in=True)

        def merged() -> bool:
            job = daemon.store.get(image)
            return job is not None and job.state is State.DONE and is_settled(daemon)

        wait_for(merged, 30, "the caption merged on the second try")
    caption = (root / "photo.txt").read_text().rstrip("\n")
    xmp = pyexiv2.Image(str(sidecar))
    try:
        properties = xmp.read_xmp()
    finally:
        xmp.close()
    assert properties["Xmp.xmp.Rating"] == "2"  # the person's edit
    assert properties["Xmp.dc.description"] == {'lang="x-default"': caption}
    assert fake.calls[key] == 1 and sum(fake.calls.values()) == 1  # the retry came from the journal
    assert sorted(p.name for p in root.iterdir()) == ["photo.png", "photo.txt", "photo.xmp"]
