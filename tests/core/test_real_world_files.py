"""Files as cameras, phones and other tools make them (``tests/data/real``: exiftool's and Pillow's
test images), through the daemon and ``phicapctl caption-file``: each is captioned or fails with
a specific code naming it, the daemon goes on, EXIF orientation is applied before the model sees
the image, and what ``embed`` and ``xmp`` leave behind is read back with exiftool: our caption,
and the file's own metadata (maker notes, IPTC, XMP, another tool's description) kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from phicapd.captioner import Caption, CaptionRequest
from phicapd.cli.ctl import main
from phicapd.outputs.makernotes import exif_rewritable
from phicapd.pipeline.journal import State
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool is not on PATH (Debian: apt-get install libimage-exiftool-perl; CI installs it)",
)

#: The samples that cannot be captioned, and the code that says why.
UNDECODABLE = {"truncated_jpeg.jpg": "image_truncated"}
#: exiftool's camera samples whose description field is empty or a placeholder: ``embed`` writes ours.
UNDESCRIBED = ("Canon.jpg", "Nikon.jpg", "Olympus.jpg", "Pentax.jpg", "Panasonic.jpg", "Kodak.jpg", "Minolta.jpg")
#: exiftool's samples another tool described (EXIF, IPTC or XMP): ``skip`` keeps them as they are.
DESCRIBED = ("ExifTool.jpg", "XMP.jpg", "IPTC.jpg", "PhotoMechanic.jpg", "MWG.jpg")
#: Samples whose metadata exiv2 cannot parse, so nothing can be embedded into them.
UNEMBEDDABLE = ("hopper_bad_exif.jpg", "invalid-exif.jpg", "icc-after-SOF.jpg")
#: Pillow's MPO from a Nintendo 3DS, under the name such a photo has on a card: its maker note is
#: one exiv2 does not decode (``outputs.makernotes``).
NINTENDO = "3ds.jpg"


class Recorder(FakeCaptioner):
    """The fake model, keeping each image it was shown (by the key its caption carries)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Image.Image] = {}

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        for request in batch:
            self.seen[image_key(request.image)] = request.image.copy()
        return super().caption(batch)


def _copy(names: Sequence[str], into: Path) -> list[Path]:
    """Copies of the samples, an hour old as files from a card, a share or an archive are (a
    truncated file modified seconds ago may still be being written: ``image_incomplete``)."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    hour_ago = time.time() - 3600
    for name in names:
        target = into / (NINTENDO if name == "frozenpond.mpo" else name)
        shutil.copyfile(REAL / name, target)
        os.utime(target, (hour_ago, hour_ago))
        out.append(target)
    return out


def _samples() -> list[str]:
    return sorted(p.name for p in REAL.iterdir() if p.name != "README.md")


def _exiftool(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["exiftool", "-j", "-a", "-G0:1", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _tags(path: Path) -> dict[str, object]:
    """Every tag exiftool reads in ``path``, "Family0:Family1:Name" -> value (numbers as stored)."""
    (tags,) = _exiftool("-n", str(path))
    return {
        k: v
        for k, v in tags.items()
        if k.split(":")[0] not in ("SourceFile", "File", "System", "ExifTool", "Composite")
    }


def _descriptions(path: Path) -> dict[str, object]:
    (tags,) = _exiftool(
        "-charset", "iptc=UTF8", "-EXIF:ImageDescription", "-IPTC:Caption-Abstract", "-XMP-dc:Description", str(path)
    )
    return {k.split(":")[-1]: v for k, v in tags.items() if k != "SourceFile"}


#: Tags whose value is where something lies in the file: a rewrite moves it, rightly.
_MOVES = ("Offset", "Start", "ThumbnailImage", "PreviewImage")


def _maker_notes(tags: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in tags.items() if k.startswith("MakerNotes:") and not k.endswith(_MOVES)}


def test_every_sample_is_captioned_or_fails_with_a_specific_code_and_the_daemon_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "in"
    images = _copy(_samples(), root)
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "json"]\n')
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 60, "every sample")
        records = daemon.store.records(images)
        unique_image(1).save(root / "after.png")  # still captioning after every odd file
        wait_for(lambda: (root / "after.txt").exists(), 30, "an image that arrives afterwards")
        assert daemon.is_ready()
    failed = {p.name: (r.error_code, r.error_message) for p, r in records.items() if r.state is State.FAILED}
    assert {name: code for name, (code, _) in failed.items()} == UNDECODABLE
    for name, (_, message) in failed.items():
        assert str(root / name) in str(message)
    for image in images:
        if image.name not in UNDECODABLE:
            assert records[image].state is State.DONE, image.name
            text = (root / f"{image.stem}.txt").read_text()
            assert json.loads((root / f"{image.stem}.json").read_text())["caption"] == text.rstrip("\n")


def test_phicapctl_caption_file_captions_each_sample_or_names_it_with_a_code(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "loose"
    images = _copy(_samples(), elsewhere)
    images += _copy(["frozenpond.mpo"], elsewhere / "mpo")  # an MPO under its own extension too
    images[-1] = images[-1].rename(elsewhere / "frozenpond.mpo")
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, FakeCaptioner()):
        rc = main(["--socket", str(settings.control.socket), "caption-file", "--json", *map(str, images)])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["path"] for o in out] == [str(p) for p in images]
    failed = {Path(o["path"]).name: o["error"] for o in out if o["state"] != "captioned"}
    assert {name: e["code"] for name, e in failed.items()} == UNDECODABLE
    assert all(name in e["message"] or str(elsewhere / name) in e["message"] for name, e in failed.items())
    assert rc != 0
    for o in out:
        if o["state"] == "captioned":
            assert Path(o["sidecar"]).read_text().rstrip("\n") == o["caption"]


def test_exif_orientation_is_applied_before_the_model_sees_the_image(tmp_path: Path) -> None:
    root = tmp_path / "in"
    oriented = [f"hopper_orientation_{n}.jpg" for n in range(2, 9)]
    _copy(["hopper.jpg", *oriented, "orientation_rectangle.jpg"], root)
    fake = Recorder()
    with running_daemon(settings_for(tmp_path, [root]), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 9, 60, "nine captions")

    def seen(name: str) -> Image.Image:
        key = (root / f"{Path(name).stem}.txt").read_text().split()[-1].rstrip(".")
        return fake.seen[key]

    def difference(a: Image.Image, b: Image.Image) -> float:
        return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3

    upright = seen("hopper.jpg")
    for name in oriented:
        with Image.open(REAL / name) as stored:
            as_stored = stored.convert("RGB")
        # The file's pixels are far from the upright image (a mean difference of 59-82 of 255);
        # what the model got is it, but for the noise of the file's own JPEG encoding (about 5).
        assert difference(as_stored, upright) > 40, name
        assert difference(seen(name), upright) < 10, name
    assert seen("orientation_rectangle.jpg").size == (1, 2)  # stored 2x1, Orientation 8


@needs_exiftool
def test_embed_writes_our_caption_keeps_maker_notes_and_other_tools_descriptions(tmp_path: Path) -> None:
    root = tmp_path / "in"
    images = _copy([*UNDESCRIBED, *DESCRIBED, *UNEMBEDDABLE, "frozenpond.mpo"], root)
    before = {p.name: (p.read_bytes(), _tags(p)) for p in images}
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra='formats = ["embed"]\n')
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 60, "every image")
        records = daemon.store.records(images)
    # Described by another tool: not even sent to the model, and left byte for byte.
    assert sum(fake.calls.values()) == len(UNDESCRIBED) + len(UNEMBEDDABLE) + 1
    for name in DESCRIBED:
        assert (root / name).read_bytes() == before[name][0], name
    assert _descriptions(root / "MWG.jpg") == {
        "ImageDescription": "RIGHT-EXIF-Description",
        "Caption-Abstract": "WRONG-IPTC-Description",
        "Description": "WRONG-XMP-Description",
    }
    for name in (NINTENDO, *UNDESCRIBED):
        path = root / name
        assert records[path].state is State.DONE, name
        ours = records[path].caption
        found = _descriptions(path)
        assert found["Description"] == found["Caption-Abstract"] == ours, name
        after = _tags(path)
        kept = _maker_notes(before[name][1])
        assert kept, f"{name} has maker notes"
        assert _maker_notes(after) == kept, name
        if name in (NINTENDO, "Kodak.jpg"):  # maker notes exiv2 keeps opaque: EXIF is not rewritten
            assert "ImageDescription" not in found
            assert {k: v for k, v in after.items() if k.startswith("EXIF:")} == {
                k: v for k, v in before[name][1].items() if k.startswith("EXIF:")
            }
        else:
            assert found["ImageDescription"] == ours
    for name in UNEMBEDDABLE:
        path = root / name
        assert records[path].state is State.FAILED, name
        assert records[path].error_code == "image_metadata_unreadable", name
        assert str(path) in str(records[path].error_message)
        assert path.read_bytes() == before[name][0]
        assert records[path].attempts == 1  # parked, not retried: it cannot change by itself


@needs_exiftool
def test_overwrite_keeps_every_other_iptc_and_xmp_value(tmp_path: Path) -> None:
    root = tmp_path / "in"
    images = _copy(list(DESCRIBED), root)
    before = {p.name: _tags(p) for p in images}
    settings = settings_for(tmp_path, [root], extra='formats = ["embed"]\nexisting = "overwrite"\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == len(images), 60, "every image")
        captions = {p.name: r.caption for p, r in daemon.store.records(images).items()}
    ours = ("ImageDescription", "Caption-Abstract", "Description", "XMPToolkit")
    for image in images:
        after = _tags(image)
        assert _descriptions(image) == dict.fromkeys(
            ("ImageDescription", "Caption-Abstract", "Description"), captions[image.name]
        )
        for key, value in before[image.name].items():
            group, name = key.split(":")[0], key.split(":")[-1]
            if group not in ("IPTC", "XMP", "MakerNotes") or name in ours or name.endswith(_MOVES):
                continue
            if key == "XMP:XMP-rdf:About":  # the XMP Toolkit moves a legacy rdf:about UUID here
                assert after["XMP:XMP-xmpMM:InstanceID"] == value, image.name
            else:
                assert after.get(key) == value, (image.name, key)


@needs_exiftool
def test_xmp_sidecars_hold_our_caption_and_leave_the_images_alone(tmp_path: Path) -> None:
    root = tmp_path / "in"
    images = _copy([*UNDESCRIBED, *DESCRIBED, *UNEMBEDDABLE, "frozenpond.mpo"], root)
    before = {p.name: p.read_bytes() for p in images}
    settings = settings_for(tmp_path, [root], extra='formats = ["xmp"]\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == len(images), 60, "every image")
        captions = {p: r.caption for p, r in daemon.store.records(images).items()}
    for image in images:
        assert image.read_bytes() == before[image.name], image.name
        assert _descriptions(image.with_suffix(".xmp")) == {"Description": captions[image]}


def test_exif_is_rewritable_without_a_maker_note_or_with_one_exiv2_decoded() -> None:
    assert exif_rewritable({"Exif.Image.Make"})
    assert exif_rewritable({"Exif.Photo.MakerNote", "Exif.MakerNote.Offset", "Exif.Canon.ModelID"})
    assert not exif_rewritable({"Exif.Photo.MakerNote", "Exif.Image.Make"})


def test_phicapctl_embed_into_an_image_exiv2_cannot_parse_names_it_with_a_code(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "loose"
    images = _copy(UNEMBEDDABLE, elsewhere)
    before = {p: p.read_bytes() for p in images}
    settings = settings_for(tmp_path, [], extra='[sidecar]\nformats = ["embed"]\n')
    with running_daemon(settings, FakeCaptioner()):
        rc = main(["--socket", str(settings.control.socket), "caption-file", "--json", *map(str, images)])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc != 0
    for image, o in zip(images, out, strict=True):
        assert o["state"] == "failed" and o["error"]["code"] == "image_metadata_unreadable", o
        assert str(image) in o["error"]["message"]
        assert image.read_bytes() == before[image]
