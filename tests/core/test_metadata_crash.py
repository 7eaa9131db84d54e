"""A file that crashes exiv2 (or sends it into an endless loop) costs the daemon nothing but that
file: it is parked with ``metadata_crashed``, every other image gets all its outputs, and neither
a rescan nor a restart captions it again or goes down on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from phicapd.outputs import metadata
from phicapd.pipeline.journal import State
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")

CRASHING = Path(__file__).resolve().parents[1] / "support" / "crashing_exiv2_worker.py"


def _description(path: Path) -> object:
    image = pyexiv2.Image(str(path))
    try:
        return image.read_xmp().get("Xmp.dc.description")
    finally:
        image.close()


@pytest.mark.parametrize(
    ("formats", "mode"),
    [(["txt", "embed"], "abort"), (["xmp"], "abort"), (["txt", "embed"], "hang")],
    ids=["embed-abort", "xmp-abort", "embed-hang"],
)
def test_a_file_that_crashes_exiv2_is_parked_and_everything_else_is_captioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, formats: list[str], mode: str
) -> None:
    monkeypatch.setattr(metadata, "WORKER_COMMAND", [sys.executable, str(CRASHING), mode])
    monkeypatch.setattr(metadata, "TIMEOUT_SECONDS", 0.5)
    root = tmp_path / "in"
    root.mkdir()
    hostile = root / "hostile.png"
    hostile_key = write_unique_png(hostile, 1)
    others = [root / "a.png", root / "b.png"]
    for i, path in enumerate(others, 2):
        write_unique_png(path, i)
    hostile_bytes = hostile.read_bytes()
    listed = ", ".join(f'"{f}"' for f in formats)
    settings = settings_for(tmp_path, [root], extra=f"formats = [{listed}]\n")
    fake = FakeCaptioner()

    def parked(daemon: object) -> bool:
        job = daemon.store.get(hostile)  # type: ignore[attr-defined]
        return job is not None and job.state is State.FAILED

    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and parked(daemon), 30, "the hostile image to be parked")
        assert daemon.store.counts()["done"] == 2
        deaths = metadata._supervisor.died
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the rescan")
        failures = daemon.api.failures(50)
        # A parked image whose bytes did not change is not handed to exiv2 again by the scans.
        assert metadata._supervisor.died == deaths
    with running_daemon(settings, fake) as daemon:  # and a restart's catch-up scan
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
        job = daemon.store.get(hostile)
        assert daemon.store.counts()["done"] == 2
    assert metadata._supervisor.died == deaths
    assert job is not None and job.state is State.FAILED and job.attempts == 1
    assert job.error_code == "metadata_crashed"
    assert str(hostile) in (job.error_message or "")
    assert ("SIGABRT" if mode == "abort" else "no answer within 0.5 s") in (job.error_message or "")
    (failure,) = failures
    assert failure["path"] == str(hostile) and failure["code"] == "metadata_crashed"
    assert failure["state"] == "failed"
    # Captioned once (the write crashed), never again; every other image once, with every output.
    assert fake.calls[hostile_key] == 1 and sum(fake.calls.values()) == 3
    assert hostile.read_bytes() == hostile_bytes
    for path in others:
        if "txt" in formats:
            caption = path.with_suffix(".txt").read_text().rstrip("\n")
        else:
            caption = _description(path.with_suffix(".xmp"))['lang="x-default"']  # type: ignore[index]
        if "embed" in formats:
            assert _description(path) == {'lang="x-default"': caption}
        assert fake.calls[image_key(Image.open(path).convert("RGB"))] == 1
    expected = {p.name for p in others} | {"hostile.png"}
    expected |= {p.with_suffix(".txt" if "txt" in formats else ".xmp").name for p in others}
    assert {p.name for p in root.iterdir()} == expected  # nothing for hostile.png, no temp file
