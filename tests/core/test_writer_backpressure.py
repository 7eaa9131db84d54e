"""Back-pressure from the writer: a writer slower than the model (embed, XMP) holds the GPU
instead of letting captions pile up in memory, where a crash would send them all to the model
again (issue 18: after a kill -9, 1,476 of 2,000 images were captioned a second time)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd.pipeline import writer
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, StreamingFakeCaptioner, write_unique_png

BATCH = 4
IMAGES = 40


@contextlib.contextmanager
def _released(release: threading.Event) -> Iterator[None]:
    """A failing assertion must not leave the writer stuck (the daemon could not stop)."""
    try:
        yield
    finally:
        release.set()


def _sent_to_the_model_again(db: Path) -> int:
    """What ``Journal.recover`` would hand back to the model if the process died now: jobs on
    the model or waiting for the writer, whose caption is neither staged nor recorded."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running' AND staged = 0").fetchone()[0]


@pytest.mark.parametrize("streaming", [False, True], ids=["batches", "streaming"])
def test_a_slow_writer_holds_the_model_to_one_batch_of_unwritten_captions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(IMAGES):
        write_unique_png(root / f"img{i:03d}.png", i)
    # Two formats: a group's captions are staged in the journal before its files are written.
    extra = f'[model]\nmax_batch = {BATCH}\n[sidecar]\nformats = ["txt", "json"]\n'
    settings = settings_for(tmp_path, [root], extra=extra, settle=0.05)
    db = settings.state.dir / "journal.sqlite3"

    # The slow writer: its first group's files wait until the test lets them go.
    entered, release = threading.Event(), threading.Event()
    real_write = writer.write_sidecars

    def slow_write(items, pool=None, keep=()):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30), "never released"
        return real_write(items, pool, keep)

    monkeypatch.setattr(writer, "write_sidecars", slow_write)
    # Every hand-over to the writer: how many captions wait for it just after.
    seen: list[int] = []
    real_submit = writer.SidecarWriter.submit

    def watched_submit(self, finished):  # type: ignore[no-untyped-def]
        real_submit(self, finished)
        seen.append(self.waiting)

    monkeypatch.setattr(writer.SidecarWriter, "submit", watched_submit)

    fake = (
        StreamingFakeCaptioner(max_batch=BATCH, steps=3, step_latency=0.001)
        if streaming
        else FakeCaptioner(max_batch=BATCH)
    )
    with running_daemon(settings, fake) as daemon, _released(release):
        scheduler = daemon.scheduler
        assert scheduler is not None
        assert entered.wait(30)

        def stalled() -> bool:
            # The writer is stuck in its first group and the model has nothing on it: what the
            # daemon holds now is what a kill -9 would find.
            return scheduler.lanes()["claimed"] > 0 and not scheduler._lanes.in_flight and scheduler.writer.waiting > 0

        wait_for(stalled, 30, "the model to wait for the writer")
        made = sum(fake.calls.values())
        assert made < IMAGES  # without back-pressure the model would have captioned them all
        assert scheduler.writer.waiting <= BATCH
        assert _sent_to_the_model_again(db) <= BATCH
        release.set()
        wait_for(lambda: daemon.store.counts()["done"] == IMAGES and is_settled(daemon), 30, "all captioned")
    assert max(seen) <= BATCH
    assert len(fake.calls) == IMAGES and max(fake.calls.values()) == 1
    assert len(list(root.glob("*.json"))) == IMAGES
