"""An existing XMP sidecar that exiv2 cannot parse fails only the XMP output: the image's other
outputs are written and their caption recorded, the sidecar is left byte for byte as it was, the
image is parked with ``xmp_unreadable`` naming the sidecar, and it is not sent to the model again
(not by a rescan, not by a restart); once the sidecar is fixed, ``retry`` writes it from the
journal's caption, still without the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phicapd.outputs import metadata
from phicapd.pipeline.journal import Failure, Fingerprint, Journal, NewWork, State, Success
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")


def fp(size: int) -> Fingerprint:
    return Fingerprint(size, 5, 9)


MALFORMED = b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF'


def test_a_malformed_xmp_sidecar_fails_only_the_xmp_output(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    image, other = root / "photo.png", root / "other.png"
    sidecar = root / "photo.xmp"
    sidecar.write_bytes(MALFORMED)
    before = sidecar.stat()
    extra = 'formats = ["txt", "json", "jsonl", "xmp", "embed"]\n'
    settings = settings_for(tmp_path, [root], extra=extra)
    fake = FakeCaptioner()

    def parked(daemon: object) -> bool:
        job = daemon.store.get(image)  # type: ignore[attr-defined]
        return job is not None and job.state is State.FAILED and is_settled(daemon)  # type: ignore[arg-type]

    with running_daemon(settings, fake) as daemon:
        key = write_unique_png(image, 1, rename_in=True)
        write_unique_png(other, 2, rename_in=True)
        wait_for(lambda: parked(daemon) and daemon.store.counts()["done"] == 1, 30, "the image to be parked")
        failures = daemon.api.failures(10)
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the rescan")
    with running_daemon(settings, fake) as daemon:  # a restart's catch-up scan: not captioned again
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
        job = daemon.store.get(image)
    assert fake.calls[key] == 1 and sum(fake.calls.values()) == 2
    # Every other output holds the caption, and the journal knows it.
    caption = (root / "photo.txt").read_text().rstrip("\n")
    assert json.loads((root / "photo.json").read_text())["caption"] == caption
    manifest = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert {"file_name": "photo.png", "text": caption} in [{k: e[k] for k in ("file_name", "text")} for e in manifest]
    assert metadata.read_description(image) == caption
    assert job is not None and job.state is State.FAILED and job.caption == caption and job.attempts == 1
    assert job.formats == frozenset({"txt", "json", "jsonl", "embed"})
    # Only the XMP output failed, with a code naming the sidecar, which is as the user left it.
    assert job.error_code == "xmp_unreadable" and str(sidecar) in (job.error_message or "")
    assert [(f["path"], f["code"], f["state"]) for f in failures] == [(str(image), "xmp_unreadable", "failed")]
    assert sidecar.read_bytes() == MALFORMED and sidecar.stat().st_mtime_ns == before.st_mtime_ns
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "a temp file was left behind"
    # The user removes the broken sidecar and retries: the XMP is written from the journal.
    sidecar.unlink()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
        assert daemon.api.retry([str(image)]) == 1
        wait_for(lambda: is_settled(daemon) and daemon.store.get(image).state is State.DONE, 30, "the retry")
    assert metadata.read_description(sidecar) == caption
    assert sum(fake.calls.values()) == 2


def test_a_failure_with_written_outputs_records_their_caption(tmp_path: Path) -> None:
    store = Journal(tmp_path / "j.db", max_attempts=3, backoff_seconds=10.0)
    image = tmp_path / "a.png"
    store.enqueue_many([NewWork(image, tmp_path, fp(1))])
    (job,) = store.claim(1)
    store.mark_running([job.id])
    written = Success(job.id, "sha", "m", "p", str(image.with_suffix(".txt")), fp(2), caption="c", formats=("txt",))
    (parked,) = store.finish_many(failures=[Failure(job.id, "xmp_unreadable", "bad", False, written)])
    assert parked.state is State.FAILED and parked.error_code == "xmp_unreadable" and parked.attempts == 1
    assert (parked.caption, parked.fingerprint, parked.formats) == ("c", fp(2), frozenset({"txt"}))


def test_a_failure_that_is_not_the_images_is_not_counted_nor_parked(tmp_path: Path) -> None:
    now = [1000.0]
    store = Journal(tmp_path / "j.db", max_attempts=1, backoff_seconds=10.0, clock=lambda: now[0])
    store.enqueue_many([NewWork(tmp_path / "a.png", tmp_path, fp(1))])
    (job,) = store.claim(1)
    for _ in range(3):
        store.mark_running([job.id])
        assert store.finish_many(failures=[Failure(job.id, "image_changed", "changed", True, counted=False)]) == []
    job = store.get(tmp_path / "a.png")
    assert job is not None and job.state is State.PENDING and job.attempts == 0
    assert store.claim(1) == [] and store.next_wakeup() == now[0] + 10.0
