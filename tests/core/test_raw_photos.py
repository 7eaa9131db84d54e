"""Camera raw files in the daemon: captioned from LibRaw's picture into XMP sidecars (read back
with exiftool, a reader independent of exiv2), a broken raw failing alone with a code, and
``embed`` refused for raw files: a configuration error for a root whose patterns take them, a
refusal by phicapctl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from phicapd import image_types
from phicapd.cli.ctl import main
from phicapd.config import load_settings
from phicapd.errors import ConfigError
from phicapd.pipeline.journal import State
from phicapd.raw_roots import raw_patterns, takes_extension
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
needs_rawpy = pytest.mark.skipif(not image_types.raw_available(), reason="needs rawpy (pip install 'phicapd[raw]')")
needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None,
    reason="exiftool is not on PATH (Debian: apt-get install libimage-exiftool-perl; CI installs it)",
)
EX_DATAERR = 65


def exiftool_description(path: Path) -> object:
    """``XMP-dc:Description`` as exiftool reads it from ``path`` (None when there is none)."""
    out = subprocess.run(
        ["exiftool", "-j", "-XMP-dc:Description", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)[0].get("Description")


def _copy(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RAW / name, target)
    settled = time.time() - 3600  # not young: a failure is final, not a partial write retried
    os.utime(target, (settled, settled))
    return target


@needs_rawpy
@needs_exiftool
def test_a_dng_and_a_nef_are_captioned_into_xmp_sidecars_and_a_broken_raw_fails_alone(tmp_path: Path) -> None:
    pytest.importorskip("pyexiv2")
    root = tmp_path / "photos"
    dng = _copy("blackmagic_pocket_4k.dng", root / "IMG_0001.DNG")
    nef = _copy("nikon_coolscan.nef", root / "scan" / "DSC_0002.NEF")
    cut = root / "DSC_0003.NEF"
    cut.write_bytes((RAW / "nikon_coolscan.nef").read_bytes()[:400_000])  # a copy that stopped short
    _copy("exiftool_nikon_no_image_data.nef", root / "DSC_0004.nef")
    os.utime(cut, (time.time() - 3600,) * 2)
    # digiKam's and darktable's naming (photo.NEF.xmp), and a .txt for the dataset.
    settings = settings_for(tmp_path, [root], extra='formats = ["xmp", "txt"]\nxmp_naming = "full"\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 2, 60, "two raw captions")
        wait_for(lambda: daemon.store.counts()["failed"] == 2, 30, "the broken raws to fail")
        jobs = {p.name: daemon.store.get(p) for p in (dng, nef, cut, root / "DSC_0004.nef")}
        assert daemon.api.status()["state"] == "ready"
    # The model saw LibRaw's pictures: the DNG developed at half size, the scan's preview.
    assert sorted(fake.calls.values()) == [1, 1]
    for image, size in ((dng, "2064x1088"), (nef, "320x218")):
        caption = image.with_name(image.stem + ".txt").read_text().rstrip("\n")
        assert caption.startswith(f"A {size} test image ")
        sidecar = image.with_name(image.name + ".xmp")
        assert exiftool_description(sidecar) == caption
        assert jobs[image.name].state is State.DONE
    assert not list(root.glob("DSC_000[34]*.xmp"))
    assert (jobs["DSC_0003.NEF"].state, jobs["DSC_0003.NEF"].error_code) == (State.FAILED, "image_truncated")
    assert (jobs["DSC_0004.nef"].state, jobs["DSC_0004.nef"].error_code) == (State.FAILED, "image_corrupt")
    assert str(cut) in (jobs["DSC_0003.NEF"].error_message or "")


@needs_rawpy
@needs_exiftool
def test_phicapctl_captions_a_raw_into_lightrooms_sidecar_name(tmp_path: Path, capsys) -> None:
    pytest.importorskip("pyexiv2")
    root = tmp_path / "shoot"
    nef = _copy("nikon_coolscan.nef", root / "DSC_0001.NEF")
    settings = settings_for(tmp_path, [root], extra='formats = ["xmp"]\n')  # stem: photo.xmp
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        assert main(["--socket", str(settings.control.socket), "caption-file", "--force", str(nef)]) == 0
    assert exiftool_description(root / "DSC_0001.xmp").startswith("A 320x218 test image ")


def _config(tmp_path: Path, watch: str, sidecar: str = "") -> Path:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[state]\ndir = "{tmp_path / "s"}"\n[sidecar]\n{sidecar}\n[[watch]]\npath = "{tmp_path}"\n{watch}'
    )
    return config


@pytest.mark.parametrize(
    ("watch", "sidecar", "pattern"),
    [
        ('formats = ["txt", "embed"]\ninclude = ["*"]\n', "", "'*' (takes .cr2)"),
        ('include = ["*.jpg", "DSC_*.NEF"]\n', 'formats = ["embed"]', "'DSC_*.NEF' (takes .nef)"),
        ('formats = ["embed"]\ninclude = ["*.[dD][nN][gG]"]\n', "", "'*.[dD][nN][gG]' (takes .dng)"),
    ],
)
def test_a_root_that_embeds_and_takes_raw_files_is_a_config_error(
    tmp_path: Path, watch: str, sidecar: str, pattern: str
) -> None:
    pytest.importorskip("pyexiv2")
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, watch, sidecar))
    message = str(caught.value)
    assert f"watch[0] ({tmp_path})" in message and pattern in message
    assert 'include "embed", which cannot write into camera raw files' in message
    assert 'formats = ["xmp"]' in message  # the fix
    assert ("[sidecar] formats" in message) is bool(sidecar)


def test_a_root_that_embeds_without_patterns_leaves_raw_files_out(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("pyexiv2")
    monkeypatch.setattr(image_types, "raw_available", lambda: True)
    embeds = load_settings(_config(tmp_path, 'formats = ["embed", "txt"]\n')).watch[0]
    sidecars = load_settings(_config(tmp_path, 'formats = ["xmp", "txt"]\n')).watch[0]
    assert "*.jpg" in embeds.include and not raw_patterns(embeds.include)
    assert "*.nef" in sidecars.include and "*.cr3" in sidecars.include
    # Loaded again (a reload compares settings): still valid, still without raw files.
    assert load_settings(_config(tmp_path, 'formats = ["embed"]\ninclude = ["*.jpg", "*.tif"]\n'))


@needs_rawpy
def test_an_embedding_roots_raw_files_are_counted_as_not_captioned(tmp_path: Path) -> None:
    pytest.importorskip("pyexiv2")
    root = tmp_path / "in"
    shutil.copyfile(IMAGES / "rocket.jpg", _copy("nikon_coolscan.nef", root / "DSC_0001.NEF").with_name("a.jpg"))
    settings = settings_for(tmp_path, [root], extra='formats = ["embed"]\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 1, 30, "the JPEG's caption")
        [entry] = daemon.api.status()["unreadable"]
    assert sum(fake.calls.values()) == 1
    assert entry["by_extension"] == {".nef": 1} and entry["example"] == str(root / "DSC_0001.NEF")


@needs_rawpy
@pytest.mark.parametrize("under_a_root", [True, False])
def test_phicapctl_refuses_to_embed_into_a_raw_file(tmp_path: Path, capsys, under_a_root: bool) -> None:
    pytest.importorskip("pyexiv2")
    photos = tmp_path / "photos"
    nef = _copy("nikon_coolscan.nef", photos / "DSC_0001.NEF")
    if under_a_root:  # a root that embeds into its JPEGs; the raw is given by name
        settings = settings_for(tmp_path, [photos], extra='formats = ["embed", "txt"]\ninclude = ["*.jpg"]\n')
    else:
        settings = settings_for(tmp_path, [], extra='[sidecar]\nformats = ["embed", "txt"]\n')
    before = nef.read_bytes()
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        capsys.readouterr()
        code = main(["--socket", str(settings.control.socket), "caption-file", "--json", "--force", str(nef)])
    assert code == EX_DATAERR
    outcome = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert outcome["state"] == "failed" and outcome["error"]["code"] == "embed_raw_refused"
    assert str(nef) in outcome["error"]["message"] and 'formats = ["xmp"]' in outcome["error"]["message"]
    assert not fake.calls and nef.read_bytes() == before and not list(photos.glob("*.txt"))


@pytest.mark.parametrize(
    ("pattern", "takes"),
    [
        ("*", True),
        ("*.nef", True),
        ("*.NeF", True),
        ("photo.nef", True),
        ("DSC_*", True),
        ("*.n?f", True),
        ("*.n*", True),
        ("*.[!n]ef", True),  # .pef
        ("*.[!np]ef", False),
        ("*.jpg", False),
        ("*.xmp", False),
        ("raw/*.nef", False),  # a pattern with "/" matches no file name
        ("[", False),
        ("*[", False),
    ],
)
def test_which_include_patterns_take_raw_files(pattern: str, takes: bool) -> None:
    assert bool(raw_patterns([pattern])) is takes


def test_takes_extension_agrees_with_the_matcher_on_every_short_name() -> None:
    """Against ``pipeline.paths``'s own matcher, on every name of up to three characters before
    ``.nef`` made of the patterns' characters."""
    import itertools

    from phicapd.config import WatchRoot
    from phicapd.pipeline.paths import is_candidate_name

    patterns = ["*", "*.nef", "a*", "ab.nef", "?.NEF", "a?*", "[!a]*f", "*.[nN]e?", "b", "*.ne", "a*[!f]", "*[ef]"]
    for pattern in patterns:
        root = WatchRoot(path=Path("/r"), include=[pattern])
        alphabet = sorted({c for c in pattern if c.isalpha()} | {"x", "."})
        names = (
            "".join(p) + ".nef" for n in range(4) for p in itertools.product(alphabet, repeat=n) if p[:1] != (".",)
        )
        expected = any(is_candidate_name(name, name, root) for name in names)
        assert takes_extension(pattern, ".nef") is expected, pattern
