"""A model that breaks is the model's fault, not the images': the daemon exits for a restart
instead of parking its backlog as failed, and the images on the model count an attempt."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from phicapd.captioner import Caption, CaptionRequest
from phicapd.errors import CaptionError, PhicapError
from phicapd.pipeline.breaker import BREAKER
from phicapd.pipeline.journal import Journal
from phicapd.service import EX_SOFTWARE, Daemon
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, StreamingFakeCaptioner, image_key, unique_image, write_unique_png


class BreaksAfter(FakeCaptioner):
    """Captions batches while they fit in ``good`` images; from the first that does not, every
    call fails the way ``failure`` says."""

    def __init__(self, good: int, failure: Exception, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.good, self.failure = good, failure
        self.broken = False
        self.failed_calls = 0

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        with self._lock:
            self.broken = self.broken or sum(self.calls.values()) + len(batch) > self.good
            self.failed_calls += self.broken
        if self.broken:
            raise self.failure
        return super().caption(batch)


def _states(settings) -> dict[str, int]:
    store = Journal(settings.state.dir / "journal.sqlite3")
    try:
        return store.counts()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("failure", "failed_calls"),
    [
        # A CUDA fault: no image is tried again on the broken context.
        (CaptionError("the GPU failed: CUDA error: an illegal memory access", code="model_broken"), 1),
        # Anything else: a batch of 4 fails, then each of its images alone, then the probe image.
        (RuntimeError("something in the model keeps failing"), 1 + BREAKER + 1),
    ],
    ids=["cuda-fault", "every-image-fails"],
)
def test_a_broken_model_exits_for_a_restart_without_failing_the_backlog(
    tmp_path: Path, failure: Exception, failed_calls: int
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settled = time.time() - 60
    for i in range(60):
        write_unique_png(root / f"b{i:02d}.png", i)
        os.utime(root / f"b{i:02d}.png", (settled, settled))
    fake = BreaksAfter(10, failure, max_batch=4)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")
    # The counts below need full batches of 4: every image is queued by the start-up scan at once
    # (none is young enough to be deferred), and a batch waits for its decodes (not 5 ms of them:
    # a busy CPU decodes slower, and a batch of 3 would break the model after 7 images, not 8).
    settings.scheduler.batch_window_ms = 30_000
    with running_daemon(settings, fake, rc=EX_SOFTWARE) as daemon:
        wait_for(lambda: daemon.scheduler.broken is not None, 30, "the breaker")
        assert not daemon.healthy()
        wait_for(lambda: daemon.lifecycle.phase == "stopping", 10, "the daemon to stop on its own")
    states = _states(settings)
    assert fake.failed_calls == failed_calls
    assert states["failed"] == 0
    assert states["done"] == sum(fake.calls.values()) >= 8
    # The images on the model when it broke stay "running": the restart counts their attempt.
    assert 1 <= states["running"] <= 4
    assert states["pending"] == 60 - states["done"] - states["running"]
    assert len(list(root.glob("*.txt"))) == states["done"]


def test_a_socket_request_on_a_broken_model_gets_an_answer(tmp_path: Path) -> None:
    fake = BreaksAfter(0, CaptionError("the GPU failed: CUDA error: device-side assert", code="model_broken"))
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, fake, rc=EX_SOFTWARE) as daemon:
        future = daemon.scheduler.submit(b"\x89PNG" + b"x" * 10, name="bad.png")  # a decode error: not the model
        with pytest.raises(PhicapError) as err:
            future.result(timeout=10)
        assert err.value.code.startswith("image_")
        assert daemon.scheduler.broken is None

        buf = io.BytesIO()
        unique_image(1).save(buf, format="PNG")
        future = daemon.scheduler.submit(buf.getvalue(), name="ok.png")
        with pytest.raises(PhicapError) as err:
            future.result(timeout=10)
        assert err.value.code == "model_broken" and err.value.retryable
        wait_for(lambda: daemon.lifecycle.phase == "stopping", 10, "the daemon to stop on its own")


def test_many_images_failing_on_a_working_model_do_not_trip_the_breaker(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    keys = [write_unique_png(root / f"b{i:02d}.png", i) for i in range(40)]
    # Every third image fails the model on its own (and its batch with it); their retries at the
    # end of the backlog fail many times in a row, but the probe image shows the model works.
    bad = set(keys[::3])
    fake = StreamingFakeCaptioner(max_batch=4, steps=2, step_latency=0.001, fail_keys=bad)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] == 40 - len(bad), 60, "the good images")
        time.sleep(0.2)
        assert daemon.scheduler.broken is None and daemon.healthy()


class Poisoned(FakeCaptioner):
    """A GPU fault whenever one particular image is on the model, whatever else is with it."""

    def __init__(self, poison: str, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.poison = poison

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        if any(image_key(r.image) == self.poison for r in batch):
            raise CaptionError("the GPU failed: CUDA error: an illegal memory access", code="model_broken")
        return super().caption(batch)


def _run_once(settings, captioner) -> int:
    """Start the daemon; stop it once the work is done; its exit code (70 if the model broke)."""
    daemon = Daemon(settings, lambda _s: captioner)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run(install_signals=False)), daemon=True)
    thread.start()
    wait_for(lambda: daemon.lifecycle.phase == "stopping" or (daemon.is_ready() and is_settled(daemon)), 30, "a run")
    daemon.request_stop()
    thread.join(30)
    assert result in ([0], [EX_SOFTWARE])
    return result[0]


def test_an_image_that_breaks_the_gpu_is_parked_alone_not_with_its_batch(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    keys = [write_unique_png(root / f"b{i:02d}.png", i) for i in range(12)]
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")
    fake = Poisoned(keys[0], max_batch=4)
    for _ in range(6):  # what systemd does: start it again each time it exits 70
        if _run_once(settings, fake) == 0:
            break
    else:
        raise AssertionError("the poison image should have been parked by now")
    store = Journal(settings.state.dir / "journal.sqlite3")
    try:
        states = {p.name: store.get(p) for p in sorted(root.glob("*.png"))}
    finally:
        store.close()
    poison = states.pop("b00.png")
    assert (poison.state.value, poison.error_code) == ("failed", "interrupted")
    assert {s.state.value for s in states.values()} == {"done"}  # its first batch-mates too
    assert all(fake.calls[k] == 1 for k in keys[1:])
