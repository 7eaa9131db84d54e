"""Output detection (``outputs.detect``), without a daemon: the two questions the scheduler asks
of a queued image before it decodes it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from phicapd.outputs.detect import already_captioned, staged_fingerprint
from phicapd.pipeline.decode import fingerprint_of
from phicapd.pipeline.journal import Job
from tests.support.daemon import settings_for
from tests.support.fakes import write_unique_png


def _setup(tmp_path: Path, extra: str = ""):
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    settings = settings_for(tmp_path, [root_dir], extra)
    image = root_dir / "photo.png"
    write_unique_png(image, 1)
    return settings, settings.watch[0], image


def _job(image: Path, root: Path, **fields) -> Job:
    return Job(1, image, root, "pending", 0, fields.pop("force", False), fingerprint_of(image), **fields)


def _no_claims(path: Path) -> dict[str, str]:
    return {}


def _listing(directory: Path, root) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".png"))


def test_an_image_whose_sidecar_appeared_is_already_captioned_under_its_base(tmp_path: Path) -> None:
    settings, root, image = _setup(tmp_path)
    job = _job(image, root.path)
    assert already_captioned(job, settings, root, _no_claims, _listing) is None  # no sidecar yet
    image.with_suffix(".txt").write_text("a caption someone wrote\n")
    assert already_captioned(job, settings, root, _no_claims, _listing) == "photo"
    # Forced: captioned again whatever is there.
    assert already_captioned(_job(image, root.path, force=True), settings, root, _no_claims, _listing) is None


def test_a_sidecar_older_than_its_image_is_not_kept_under_skip(tmp_path: Path) -> None:
    settings, root, image = _setup(tmp_path)
    sidecar = image.with_suffix(".txt")
    sidecar.write_text("an old caption\n")
    past = image.stat().st_mtime_ns - 10_000_000_000
    os.utime(sidecar, ns=(past, past))
    assert already_captioned(_job(image, root.path), settings, root, _no_claims, _listing) is None


def test_a_staged_caption_is_written_only_for_the_bytes_it_was_made_from(tmp_path: Path) -> None:
    settings, root, image = _setup(tmp_path)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    staged = _job(image, root.path, staged=True, caption="a cat", sha256=sha)
    assert staged_fingerprint(staged, settings, root, fingerprint_of) == fingerprint_of(image)
    # Not staged, or staged for other bytes: the model is asked.
    assert (
        staged_fingerprint(_job(image, root.path, caption="a cat", sha256=sha), settings, root, fingerprint_of) is None
    )
    write_unique_png(image, 2)
    assert staged_fingerprint(staged, settings, root, fingerprint_of) is None
