"""Descriptions written by other tools (cameras, photo managers) in EXIF, IPTC or XMP in any
language are kept under ``existing = "skip"``; a camera's placeholder is no description. What the
daemon left in each image is read back with exiftool, a reader independent of exiv2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from phicapd.outputs import metadata
from phicapd.outputs.placeholders import is_placeholder
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner

pytest.importorskip("pyexiv2")

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool is not on PATH (Debian: apt-get install libimage-exiftool-perl; CI installs it)",
)


def _exiftool_write(path: Path, *assignments: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", *assignments, str(path)], check=True)


def _exiftool_read(path: Path) -> dict[str, object]:
    out = subprocess.run(
        [
            "exiftool",
            "-j",
            "-charset",
            "iptc=UTF8",
            "-EXIF:ImageDescription",
            "-IPTC:Caption-Abstract",
            "-XMP-dc:Description",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {k: v for k, v in json.loads(out)[0].items() if k != "SourceFile"}


@pytest.mark.parametrize(
    ("text", "placeholder"),
    [
        ("OLYMPUS DIGITAL CAMERA         ", True),
        ("sony dsc", True),
        ("KODAK Digital Still Camera", True),
        ("\0\0\0\0", True),
        ("   ", True),
        ("", True),
        ("Sunset over the bay", False),
        ("SONY DSC at the harbour", False),
    ],
)
def test_camera_placeholders_are_no_description(text: str, placeholder: bool) -> None:
    assert is_placeholder(text) is placeholder


@needs_exiftool
def test_every_field_and_language_is_read_and_placeholders_are_left_out(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", image)
    assert metadata.read_descriptions(image) == ()
    _exiftool_write(image, "-EXIF:ImageDescription=SONY DSC   ", "-IPTC:Caption-Abstract=   ")
    assert metadata.read_descriptions(image) == ()
    _exiftool_write(image, "-XMP-dc:Description-de=Ein Hafen")
    assert metadata.read_descriptions(image) == ("Ein Hafen",)
    _exiftool_write(image, "-EXIF:ImageDescription=Harbour", "-IPTC:Caption-Abstract=Harbour")
    assert metadata.read_descriptions(image) == ("Ein Hafen", "Harbour")


@needs_exiftool
def test_embed_keeps_another_tools_exif_and_iptc_and_replaces_a_camera_placeholder(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    described, olympus = root / "described.jpg", root / "olympus.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", described)
    shutil.copyfile(IMAGES / "hubble_deep_field.jpg", olympus)
    _exiftool_write(
        described, "-EXIF:ImageDescription=Launch at dawn", "-IPTC:Caption-Abstract=Launch at dawn, pad 39A"
    )
    _exiftool_write(olympus, "-EXIF:ImageDescription=OLYMPUS DIGITAL CAMERA         ")
    before = described.read_bytes()
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra='formats = ["embed"]\n')
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 1, 60, "one caption")
    assert sum(fake.calls.values()) == 1, "the described image went to the model"
    assert described.read_bytes() == before
    assert _exiftool_read(described) == {
        "ImageDescription": "Launch at dawn",
        "Caption-Abstract": "Launch at dawn, pad 39A",
    }
    ours = _exiftool_read(olympus)
    caption = ours["Description"]
    assert isinstance(caption, str) and caption and not is_placeholder(caption)
    assert ours == {"ImageDescription": caption, "Caption-Abstract": caption, "Description": caption}


@needs_exiftool
def test_a_field_another_tool_changes_after_our_embed_is_kept(tmp_path: Path) -> None:
    """Our caption in every field, then a photo manager rewrites EXIF only (new bytes): their
    text is a description of its own, so ``skip`` neither captions the image again nor touches it."""
    root = tmp_path / "in"
    root.mkdir()
    image = root / "photo.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", image)
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra='formats = ["embed"]\n')
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 1, 60, "the caption")
    caption = _exiftool_read(image)["Description"]
    _exiftool_write(image, "-EXIF:ImageDescription=Rocket on the pad, edited by hand")
    later = time.time_ns() + 5_000_000_000  # unmistakably newer bytes than the ones captioned

    os.utime(image, ns=(later, later))
    with running_daemon(settings, fake) as daemon:  # the catch-up scan sees the changed image
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 1
    assert _exiftool_read(image) == {
        "ImageDescription": "Rocket on the pad, edited by hand",
        "Caption-Abstract": caption,
        "Description": caption,
    }


@needs_exiftool
def test_phicapctl_caption_file_keeps_another_tools_description_outside_every_root(tmp_path: Path, capsys) -> None:
    from phicapd.cli.ctl import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    described, olympus = elsewhere / "described.jpg", elsewhere / "olympus.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", described)
    shutil.copyfile(IMAGES / "hubble_deep_field.jpg", olympus)
    _exiftool_write(described, "-IPTC:Caption-Abstract=Launch at dawn")
    _exiftool_write(olympus, "-EXIF:ImageDescription=OLYMPUS DIGITAL CAMERA")
    settings = settings_for(tmp_path, [], extra='[sidecar]\nformats = ["embed"]\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake):
        for image in (described, olympus):
            assert main(["--socket", str(settings.control.socket), "caption-file", str(image)]) == 0
    capsys.readouterr()
    assert sum(fake.calls.values()) == 1
    assert _exiftool_read(described) == {"Caption-Abstract": "Launch at dawn"}
    caption = _exiftool_read(olympus)["Description"]
    assert _exiftool_read(olympus)["ImageDescription"] == caption and not is_placeholder(str(caption))
