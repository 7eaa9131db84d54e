"""The scheduler on its own: driven with a fake captioner, a journal in a temporary directory
and in-process decoders, with no daemon, watcher or socket around it."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from phicapd.captioner import Caption, CaptionRequest
from phicapd.config import Settings
from phicapd.errors import PhicapError
from phicapd.pipeline.breaker import BREAKER
from phicapd.pipeline.decode import fingerprint_of, make_decoders
from phicapd.pipeline.journal import Journal, NewWork
from phicapd.pipeline.scheduler import Scheduler
from tests.support.daemon import settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image, write_unique_png


class Metrics:
    """What the scheduler observes, by lane."""

    def __init__(self) -> None:
        self.captions: list[str] = []
        self.failures: list[tuple[str, str]] = []

    def observe_caption(self, lane: str, seconds: float) -> None:
        self.captions.append(lane)

    def observe_failure(self, lane: str, code: str) -> None:
        self.failures.append((lane, code))


class HeldCaptioner(FakeCaptioner):
    """Records each batch's image keys; the first batch waits until the test lets it go."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.batches: list[list[str]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        self.batches.append([image_key(r.image) for r in batch])
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(30), "never released"
        return super().caption(batch)


def _png(index: int) -> bytes:
    buf = io.BytesIO()
    unique_image(index).save(buf, format="PNG")
    return buf.getvalue()


def _backlog(tmp_path: Path, images: int) -> tuple[Settings, Path, list[str]]:
    root = tmp_path / "in"
    root.mkdir()
    keys = [write_unique_png(root / f"img{i:02d}.png", i) for i in range(images)]
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 2\n")
    # Full batches of two, however slowly a busy CPU decodes: a batch waits for its decodes.
    settings.scheduler.batch_window_ms = 30_000
    return settings, root, keys


@contextmanager
def _running(settings: Settings, captioner: FakeCaptioner, metrics: Metrics | None = None) -> Iterator[Scheduler]:
    settings.state.dir.mkdir(parents=True, exist_ok=True)
    store = Journal(
        settings.state.dir / "journal.sqlite3",
        max_attempts=settings.scheduler.max_attempts,
        backoff_seconds=settings.scheduler.retry_backoff_seconds,
    )
    for root in settings.watch:
        images = sorted(root.path.glob("*.png"))
        store.enqueue_many(NewWork(p, root.path, fingerprint_of(p)) for p in images)  # type: ignore[arg-type]
    decode_file, decode_bytes = make_decoders(settings.imaging)
    scheduler = Scheduler(
        settings,
        captioner,
        store,
        decode_file=decode_file,
        decode_bytes=decode_bytes,
        list_images=lambda directory, _root: sorted(p.name for p in directory.glob("*.png")),
        metrics=metrics,  # type: ignore[arg-type]
    )
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop(10)
        store.close()


def test_the_backlog_is_captioned_written_and_recorded(tmp_path: Path) -> None:
    settings, root, keys = _backlog(tmp_path, 6)
    metrics, fake = Metrics(), FakeCaptioner(max_batch=4)
    with _running(settings, fake, metrics) as scheduler:
        wait_for(lambda: scheduler.store.counts()["done"] == 6, 30, "the backlog")
        assert scheduler.max_batch == 2  # the config's, below the backend's
        assert max(fake.batch_sizes) <= 2
        assert scheduler.throughput.total == 6
    assert sorted(fake.calls) == sorted(keys) and set(fake.calls.values()) == {1}
    assert (root / "img00.txt").read_text().startswith("A 8x8 test image")
    assert metrics.captions == ["background"] * 6 and metrics.failures == []


def test_a_socket_request_goes_on_the_model_before_the_backlog(tmp_path: Path) -> None:
    settings, _, keys = _backlog(tmp_path, 8)
    fake = HeldCaptioner(max_batch=2)
    with _running(settings, fake) as scheduler:
        assert fake.entered.wait(30)
        wait_for(lambda: scheduler.lanes()["background_ready"] >= 2, 30, "decoded backlog images")
        future = scheduler.submit(_png(1000), name="ask.png")
        wait_for(lambda: scheduler.lanes()["interactive"] == 1, 30, "the request in its lane")
        fake.release.set()
        assert future.result(timeout=30).text.startswith("A 8x8 test image")
        wait_for(lambda: scheduler.store.counts()["done"] == 8, 30, "the backlog")
    # The next batch after the one on the model holds the request first, beside the backlog.
    assert fake.batches[1][0] == image_key(unique_image(1000))
    assert sorted(k for batch in fake.batches for k in batch if k != fake.batches[1][0]) == sorted(keys)


def test_failures_are_counted_by_lane_and_fail_only_their_image(tmp_path: Path) -> None:
    settings, root, keys = _backlog(tmp_path, 4)
    metrics = Metrics()
    fake = FakeCaptioner(max_batch=2, fail_keys={keys[1]})
    with _running(settings, fake, metrics) as scheduler:
        wait_for(lambda: scheduler.store.counts()["failed"] == 1, 30, "the bad image parked")
        assert scheduler.store.counts()["done"] == 3
        bad = scheduler.submit(b"\x89PNG" + b"x" * 10, name="bad.png")
        with pytest.raises(PhicapError) as err:
            bad.result(timeout=30)
        assert scheduler.broken is None  # the images' fault, not the model's
    # Each of its attempts failed it alone (its batch-mate was captioned), once per attempt.
    assert metrics.failures.count(("background", "caption_failed")) == settings.scheduler.max_attempts
    assert ("interactive", err.value.code) in metrics.failures and err.value.code.startswith("image_")
    assert len(metrics.failures) == settings.scheduler.max_attempts + 1
    assert not (root / "img01.txt").exists() and (root / "img00.txt").exists()


class AlwaysFailing(FakeCaptioner):
    """Every call fails, the probe's too: the model, not the images."""

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        self.batch_sizes.append(len(batch))
        raise RuntimeError("something in the model keeps failing")


def test_a_broken_model_stops_the_worker_and_leaves_its_images_running(tmp_path: Path) -> None:
    settings, _, _ = _backlog(tmp_path, 8)
    fake = AlwaysFailing(max_batch=2)
    with _running(settings, fake) as scheduler:
        wait_for(lambda: scheduler.broken is not None, 30, "the breaker")
        assert scheduler.broken.code == "model_broken"  # type: ignore[union-attr]
        assert not scheduler.healthy(60)
        late = scheduler.submit(_png(2000), name="late.png")
    # A batch of two fails, then each image alone; again, until BREAKER in a row; then the probe.
    assert BREAKER == 4
    assert fake.batch_sizes == [2, 1, 1, 2, 1, 1, 1]
    with pytest.raises(PhicapError) as err:
        late.result(timeout=1)  # answered at the stop, never left waiting
    assert err.value.code == "shutting_down"
    store = Journal(settings.state.dir / "journal.sqlite3")
    counts = store.counts()
    store.close()
    assert counts["failed"] == 0 and counts["done"] == 0
    assert counts["running"] == 1  # on the model when it broke: the restart counts its attempt
    assert counts["pending"] == 7
