"""Camera raw files through the real model path: the daemon decodes a DNG and a NEF in its decode
workers (LibRaw), the native engine on the tiny checkpoint captions LibRaw's pictures, and the
XMP sidecars hold the captions, as exiftool reads them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from phicapd import image_types
from tests.core.test_raw_photos import RAW, exiftool_description, needs_exiftool
from tests.model.helpers import make_captioner
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for


@needs_exiftool
@pytest.mark.skipif(not image_types.raw_available(), reason="needs rawpy (pip install 'phicapd[raw]')")
def test_a_dng_and_a_nef_are_captioned_by_the_native_engine(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pytest.importorskip("pyexiv2")
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copyfile(RAW / "blackmagic_pocket_4k.dng", root / "IMG_0001.dng")
    shutil.copyfile(RAW / "nikon_coolscan.nef", root / "DSC_0002.NEF")
    captioner = make_captioner(tiny_checkpoint, max_batch=2, max_new_tokens=8, strip_openers=[])
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "xmp"]\n[model]\nmax_new_tokens = 8\n')
    with running_daemon(settings, captioner) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 2, 120, "two raw captions")
    for stem in ("IMG_0001", "DSC_0002"):
        caption = (root / f"{stem}.txt").read_text().rstrip("\n")
        assert caption  # the tiny model's words, whatever they are
        assert exiftool_description(root / f"{stem}.xmp") == caption
