"""XMP sidecars (merged into darktable's and Lightroom's) and captions embedded in the image,
read back with pyexiv2's reader and, for sidecars, a plain XML parser."""

from __future__ import annotations

import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from phicapd.config import load_settings
from phicapd.errors import ConfigError
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")

DATA = Path(__file__).resolve().parents[1] / "data" / "xmp"
IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
DC = "{http://purl.org/dc/elements/1.1/}"


def _xmp(path: Path) -> dict[str, object]:
    image = pyexiv2.Image(str(path))
    try:
        return image.read_xmp()
    finally:
        image.close()


def _xml_description(path: Path) -> str:
    """dc:description x-default as a plain XML reader sees it (element or attribute form)."""
    root = ET.parse(path).getroot()
    for element in root.iter(f"{DC}description"):
        for li in element.iter(f"{RDF}li"):
            if li.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default":
                return li.text or ""
    raise AssertionError(f"no dc:description in {path}")


@pytest.mark.parametrize(
    ("sample", "naming", "sidecar_name"),
    [("darktable.jpg.xmp", "full", "photo.jpg.xmp"), ("lightroom.xmp", "stem", "photo.xmp")],
)
def test_xmp_sidecar_is_merged_keeping_every_other_field(
    tmp_path: Path, sample: str, naming: str, sidecar_name: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copyfile(IMAGES / "rocket.jpg", root / "photo.jpg")
    sidecar = root / sidecar_name
    shutil.copyfile(DATA / sample, sidecar)
    time.sleep(0.01)
    (root / "photo.jpg").touch()  # the photo is newer than its (caption-less) sidecar
    before = _xmp(sidecar)
    assert "Xmp.dc.description" not in before and before["Xmp.xmp.Rating"] in ("4", "5")
    settings = settings_for(tmp_path, [root], extra=f'formats = ["txt", "xmp"]\nxmp_naming = "{naming}"\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and (root / "photo.txt").exists(), 30, "the caption")
    caption = (root / "photo.txt").read_text().rstrip("\n")
    after = _xmp(sidecar)
    assert after.pop("Xmp.dc.description") == {'lang="x-default"': caption}
    assert after == before  # ratings, keywords, darktable's history, Lightroom's settings
    assert _xml_description(sidecar) == caption
    assert sorted(p.name for p in root.iterdir()) == sorted(["photo.jpg", "photo.txt", sidecar_name])
    assert sum(fake.calls.values()) == 1


def test_a_new_xmp_sidecar_is_made_and_a_described_one_is_kept_under_skip(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / "a.png", 1)
    write_unique_png(root / "b.png", 2)
    # b.png's sidecar already holds a caption (a person's), newer than the image.
    described = b'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">mine</rdf:li></rdf:Alt></dc:description>'
    lightroom = (DATA / "lightroom.xmp").read_bytes()
    (root / "b.xmp").write_bytes(lightroom.replace(b"<dc:subject>", described + b"<dc:subject>", 1))
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "xmp"]\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        wait_for(lambda: is_settled(daemon) and (root / "b.txt").exists() and (root / "a.txt").exists(), 30, "captions")
    assert _xml_description(root / "a.xmp") == (root / "a.txt").read_text().rstrip("\n")
    assert _xmp(root / "b.xmp")["Xmp.dc.description"] == {'lang="x-default"': "mine"}


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        image.load()
        return image.tobytes()


def _make_images(root: Path) -> dict[str, Path]:
    paths = {
        "jpeg": root / "hubble.jpg",
        "png": root / "horse.png",
        "webp": root / "coffee.webp",
        "tiff": root / "chelsea.tif",
    }
    shutil.copyfile(IMAGES / "hubble_deep_field.jpg", paths["jpeg"])
    shutil.copyfile(IMAGES / "horse.png", paths["png"])
    Image.open(IMAGES / "coffee.png").convert("RGB").save(paths["webp"], quality=90)
    Image.open(IMAGES / "chelsea.png").convert("RGB").save(paths["tiff"])
    # A tag of someone else's, which the embed must leave alone.
    for path in paths.values():
        image = pyexiv2.Image(str(path))
        image.modify_exif({"Exif.Image.Artist": "Jane Doe"})
        image.close()
    return paths


@pytest.mark.parametrize("policy", ["skip", "overwrite", "only-missing"])
def test_embed_round_trip_keeps_pixels_and_tags_and_captions_once(tmp_path: Path, policy: str) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    root = tmp_path / "in"
    root.mkdir()
    made = _make_images(staging)
    pixels = {kind: _pixels(path) for kind, path in made.items()}
    mtimes = {kind: path.stat().st_mtime_ns for kind, path in made.items()}
    extra = f'formats = ["txt", "embed"]\nexisting = "{policy}"\n'
    settings = settings_for(tmp_path, [root], extra=extra, settle=0.2)
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        paths = {kind: shutil.move(path, root / path.name) for kind, path in made.items()}
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 4, 60, "four captions")
        # The embed rewrote each image (new bytes, mtime, inode): let the watcher see that and
        # settle it, and a full scan look again: neither may caption anything a second time.
        time.sleep(1.0)
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the rescan")
    with running_daemon(settings, fake) as daemon:  # and a restart's catch-up scan
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 4 and set(fake.calls.values()) == {1}
    for kind, path in paths.items():
        path = Path(path)
        caption = path.with_suffix(".txt").read_text().rstrip("\n")
        assert _pixels(path) == pixels[kind], f"{kind}: decoded pixels changed"
        assert path.stat().st_mtime_ns == mtimes[kind], f"{kind}: the embed changed the mtime"
        image = pyexiv2.Image(str(path))
        try:
            xmp, exif, iptc = image.read_xmp(), image.read_exif(), image.read_iptc()
        finally:
            image.close()
        assert xmp["Xmp.dc.description"] == {'lang="x-default"': caption}, kind
        assert exif["Exif.Image.ImageDescription"] == caption, kind
        assert exif["Exif.Image.Artist"] == "Jane Doe", kind
        if kind != "webp":  # WebP has no IPTC
            assert iptc["Iptc.Application2.Caption"] == caption, kind
        assert not list(root.glob(".*")), "a temp file was left behind"
    assert {image_key(Image.open(p).convert("RGB")) for p in map(Path, paths.values())} == set(fake.calls)


def test_a_missing_pyexiv2_is_a_start_up_error_only_for_roots_that_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyexiv2", None)  # import pyexiv2 now raises ImportError
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = tmp_path / "c.toml"
    base = f'[state]\ndir = "{tmp_path / "s"}"\n[[watch]]\npath = "{tmp_path / "a"}"\n'
    config.write_text(base)
    assert load_settings(config).watch[0].path == tmp_path / "a"
    config.write_text(base + f'[[watch]]\npath = "{tmp_path / "b"}"\nformats = ["txt", "embed"]\n')
    with pytest.raises(ConfigError, match=r"watch\[1\]\.formats: xmp and embed needs the pyexiv2 package"):
        load_settings(config)


def test_embed_replaces_its_own_last_caption_but_never_someone_elses(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    ours, theirs = root / "ours.png", root / "theirs.png"
    write_unique_png(ours, 1)
    write_unique_png(theirs, 2)
    image = pyexiv2.Image(str(theirs))
    image.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "from the camera club"}})
    image.close()
    fake = FakeCaptioner()
    for prefix in ("one: ", "two: "):
        settings = settings_for(tmp_path, [root], extra=f'formats = ["txt", "embed"]\nprefix = "{prefix}"\n')
        with running_daemon(settings, fake) as daemon:
            wait_for(lambda p=prefix: is_settled(daemon) and (root / "ours.txt").read_text().startswith(p), 30, prefix)
            wait_for(lambda p=prefix: (root / "theirs.txt").read_text().startswith(p), 30, prefix)
        mtime = ours.stat().st_mtime_ns
        assert _xmp(ours)["Xmp.dc.description"] == {'lang="x-default"': (root / "ours.txt").read_text().rstrip()}
        assert _xmp(theirs)["Xmp.dc.description"] == {'lang="x-default"': "from the camera club"}
        # Saved again (in an editor that keeps the metadata): skip captions both again next time.
        later = mtime + 5_000_000_000
        for path in (ours, theirs):
            os.utime(path, ns=(later, later))
    assert sum(fake.calls.values()) == 4
