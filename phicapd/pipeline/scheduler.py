r"""The scheduler: two lanes into one GPU worker, with decoding ahead of it and writing behind it.

    journal --claim--> decode pool --> background lane --+
                                                          +--> GPU worker --> writer --> sidecar + journal
    socket  --------> decode pool --> interactive lane --+                \--> reply to the client

This module wires the parts and runs the GPU worker; each rule has a module of its own:

* claim and decode (``feeder``): at most ``prefetch`` background images are claimed from the
  journal and decoded ahead of the worker in a CPU pool, behind the crash-isolation gate
  (``decode_gate``: an image that was being decoded when the daemon died is decoded alone).
  Socket requests are decoded in a pool of their own, so they never queue behind the backlog.
* take (``lanes``): one thread, the GPU worker, owns the ``Captioner`` and streams work into it:
  the backend asks for more whenever it has free rows (the native engine asks before every
  decode step), and each caption comes back the moment it is done. Interactive requests are
  always taken first, and ``interactive_slots`` rows are kept free of background work, so a
  caption asked for over the socket joins the running batch at the next step instead of waiting
  for it, however long the backlog. (A batch-only backend runs batch after batch; a request then
  waits for at most the batch on the model.) When idle, the first take waits a short window to
  fill a batch. An image that was on the model when the daemon died (``interrupted``) runs
  alone, once the rows around it drained: if it is what crashes the process, only it is blamed
  again, and its batch-mates are not parked with it.
* deliver: every caption is cleaned and checked once, as it is delivered (``caption_text``):
  too long, or blank after cleaning, it is that image's failure; otherwise the writer, the
  journal and the socket reply all get the same cleaned text.
* write (``writer.py``): sidecars are written and results recorded in the journal in groups, so
  fsyncs never hold up the GPU. The writer pushes back: background rows go on the model only
  while the captions waiting for the writer plus the background rows on the model fit one batch
  (``max_batch``), so a writer slower than the model (embed, XMP) holds the GPU instead of
  piling up captions that only memory holds and that a crash would send to the model again.
  The model and the writer still overlap by a batch: one is written while the next is made.
* failures (``breaker``): when the model fails everything in flight at once, those images are
  retried one by one, so one bad image cannot fail its neighbours; a broken model stops the
  worker and the daemon exits for systemd to restart it, instead of failing the backlog.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from phicapd.caption_text import checked_caption
from phicapd.captioner import Caption, Captioner, CaptionRequest
from phicapd.config import Settings, WatchRoot
from phicapd.errors import PhicapError
from phicapd.log import get_logger
from phicapd.metrics import DaemonMetrics
from phicapd.outputs.detect import already_captioned, staged_fingerprint
from phicapd.pipeline.breaker import Breaker, as_phicap_error, is_model_fault, probe_image
from phicapd.pipeline.decode import DecodeBytes, DecodeFile, fingerprint_of
from phicapd.pipeline.decode_gate import DecodeGate
from phicapd.pipeline.feeder import Feeder, prepare_request
from phicapd.pipeline.interactive import INTERACTIVE_DECODERS, InteractiveIntake, answer, shutting_down
from phicapd.pipeline.journal import Journal
from phicapd.pipeline.lanes import Item, Lanes, Outcome
from phicapd.pipeline.progress import BusyRate
from phicapd.pipeline.throughput import Throughput
from phicapd.pipeline.writer import Finished, SidecarWriter

log = get_logger(__name__)


ListImages = Callable[[Path, WatchRoot], list[str]]

#: The window of the background caption rate behind the backlog's ETA (``pipeline.progress``).
PROGRESS_WINDOW_SECONDS = 300.0

__all__ = ["INTERACTIVE_DECODERS", "ListImages", "Scheduler", "Throughput"]


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        captioner: Captioner,
        store: Journal,
        *,
        decode_file: DecodeFile,
        decode_bytes: DecodeBytes,
        list_images: ListImages,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        """``metrics``: where caption latencies and failures are observed (none in bare tests)."""
        self.settings = settings
        self._metrics = metrics
        self.captioner = captioner
        self.store = store
        self._list_images = list_images
        self.max_batch = max(1, min(settings.model.max_batch or captioner.max_batch, captioner.max_batch))
        # Rows held free for interactive requests; only a continuous batcher can use them mid-batch.
        self.streams = captioner.continuous_batching
        self.reserve = min(settings.scheduler.interactive_slots, self.max_batch - 1) if self.streams else 0
        self.window = settings.scheduler.batch_window_ms / 1000.0

        self._request = partial(prepare_request, captioner)
        self._lanes = Lanes()
        self._cond = self._lanes.cond
        self._stopping = threading.Event()
        self._paused = False
        self._gate = DecodeGate(self._lanes, self._stopping)
        self._finished: list[Finished] = []  # background results, handed to the writer at the next take
        self.writer = SidecarWriter(
            settings, store, captioner.identity, list_images, self._recorded, on_taken=self._lanes.notify
        )
        self.feeder = Feeder(
            settings,
            store,
            self._lanes,
            self._gate,
            prefetch=max(settings.scheduler.prefetch, self.max_batch),
            decode_file=decode_file,
            make_request=self._request,
            # Output detection (``outputs.detect``), asked before an image is decoded; the settings
            # are the live ones (a reload replaces them).
            staged_fingerprint=lambda job, root: staged_fingerprint(job, self.settings, root, fingerprint_of),
            already_captioned=lambda job, root: already_captioned(
                job, self.settings, root, store.claims_near, self._list_images
            ),
            submit=self.writer.submit,
            observe_failure=self._observe_failure,
            paused=lambda: self._paused,
            stopping=self._stopping,
        )
        self.intake = InteractiveIntake(
            self._lanes,
            workers=settings.scheduler.decode_workers,
            decode_bytes=decode_bytes,
            make_request=self._request,
            observe_failure=self._observe_failure,
            stopping=self._stopping,
        )
        self.breaker = Breaker(
            captioner, lambda: self._request(probe_image(), self.settings.model.prompt, 2), self._wake_all
        )
        self._threads: list[threading.Thread] = []

        self.throughput = Throughput()
        #: Background captions only, over a longer window: the rate the backlog's ETA is based on.
        self.backlog_rate = BusyRate(PROGRESS_WINDOW_SECONDS)  # the ETA's rate: captions per busy second
        self.batches = 0
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()

    @property
    def broken(self) -> PhicapError | None:
        """Set once the model is unusable; the daemon then exits."""
        return self.breaker.broken

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (
            ("phicapd-gpu", self._worker_loop),
            ("phicapd-feeder", self.feeder.run),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.writer.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop taking work, let the batch on the GPU finish (up to ``grace`` s), hand the rest back."""
        self._stopping.set()
        self.captioner.stopping()  # a backend holding requests it cannot run now (no endpoint up) lets them go
        self._wake_all()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.writer.stop(max(1.0, deadline - time.monotonic()))
        self.feeder.stop()
        self.intake.stop()
        with self._cond:
            waiting, unfinished = self._lanes.drain(broken=self.broken is not None)
        for future in waiting:  # requests still decoding or queued: answer them now
            answer(future, shutting_down())
        if unfinished:
            self.store.release(unfinished)
            log.info("handed back unfinished jobs", jobs=len(unfinished))

    def _wake_all(self) -> None:
        """Something changed that the feeder and the worker wait on (a stop, a broken model)."""
        self.feeder.wake()
        self._lanes.notify()

    # -- inputs --------------------------------------------------------------------------------

    def notify_work(self) -> None:
        """New pending jobs are in the journal."""
        self.feeder.wake()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.feeder.wake()

    @property
    def paused(self) -> bool:
        return self._paused

    def submit(
        self, data: bytes, *, name: str, prompt: str | None = None, max_new_tokens: int | None = None
    ) -> Future[Caption]:
        """Caption image bytes in the interactive lane. The future fails with a ``PhicapError``."""
        return self.intake.submit(self.settings.model, data, name, prompt, max_new_tokens)

    # -- the GPU worker: take -> caption -> deliver ----------------------------------------------

    def _worker_loop(self) -> None:
        while self._wait_for_work():
            self.busy_since = time.monotonic()  # the model's heartbeat: renewed on every take/deliver
            self.backlog_rate.busy()
            try:
                self.captioner.stream(self._take, self._deliver)
            except Exception as e:
                with self._cond:
                    leftovers = list(self._lanes.in_flight.values())
                if is_model_fault(e):
                    self.breaker.trip(as_phicap_error(e))
                elif leftovers:
                    log.warning("the model failed, retrying its images one by one", images=len(leftovers), error=str(e))
                for item in leftovers:
                    if self.broken is not None:
                        break
                    self.busy_since = time.monotonic()
                    outcome = self.breaker.caption_one(item.request, _name(item))
                    if self.broken is None:
                        self._deliver(item.request, outcome)
                if self.broken is not None:
                    self._answer_in_flight(self.broken)
            finally:
                self._flush_finished()
                self.busy_since = None
                self.backlog_rate.idle()
                self.last_progress = time.monotonic()

    def _wait_for_work(self) -> bool:
        """Block until there is something to caption; False when stopping."""
        with self._cond:
            # Background work waits while an image is decoded alone (``DecodeGate``) and
            # while the writer is a batch behind (``_writer_room``).
            while not self._lanes.has_work(
                paused=self._paused, alone=self._gate.alone, writer_room=self._writer_room()
            ):
                if self._stopping.is_set() or self.broken is not None:
                    return False
                self.last_progress = time.monotonic()
                self._cond.wait(0.5)
            return not self._stopping.is_set() and self.broken is None

    def _take(self, room: int, idle: bool) -> list[CaptionRequest]:
        """The model asks for up to ``room`` more requests (before every step, as a heartbeat too)."""
        now = self.last_progress = self.busy_since = time.monotonic()
        self._flush_finished()
        lanes = self._lanes
        with self._cond:
            room = min(room, self.max_batch - len(lanes.in_flight))
            if idle and room > 0:
                # Nothing is running: wait a short window for a fuller first batch. A streaming
                # model takes later socket requests at its next step, so one never waits for more.
                lanes.wait_to_fill(
                    room, now + self.window, paused=self._paused, streams=self.streams, stopping=self._stopping
                )
            if self._stopping.is_set() or self.broken is not None or room <= 0:
                # Stopping: the rows on the model finish, nothing new starts; queued requests
                # get a retryable "shutting_down" and queued jobs go back to the journal.
                return []
            items = lanes.pick(
                room,
                idle,
                reserve=self.reserve,
                writer_room=self._writer_room(),
                paused=self._paused,
                alone=self._gate.alone,
            )
        jobs = [i.job.id for i in items if i.job is not None]
        if jobs:
            # Before the model sees them, so a crash on a poisonous image counts an attempt.
            self.store.mark_running(jobs)
        if items:
            self.batches += 1
        return [i.request for i in items]

    def _writer_room(self) -> int:
        """Background rows the writer's back-pressure allows on the model now (under ``_cond``):
        captions waiting for the writer and background rows on the model stay within a batch."""
        return self.max_batch - self.writer.waiting - len(self._finished) - self._lanes.background_on_model()

    def _deliver(self, request: CaptionRequest, outcome: Caption | PhicapError) -> None:
        """One image is done (or failed on its own): answer its client or hand it to the writer."""
        self.last_progress = self.busy_since = time.monotonic()
        with self._cond:
            item = self._lanes.in_flight.pop(id(request))
        if isinstance(outcome, Caption):
            # Once, for every backend and both lanes, before any output or reply holds it; before
            # any prefix/suffix, so a blank model text is a failure however it would be decorated.
            model = self.settings.model
            outcome = checked_caption(
                outcome, max_new_tokens=request.max_new_tokens, strip_openers=model.strip_openers, name=_name(item)
            )
        if not isinstance(outcome, PhicapError):
            self.breaker.succeeded()
        lane = "interactive" if item.future is not None else "background"
        if isinstance(outcome, PhicapError):
            self._observe_failure(lane, outcome)
        elif self._metrics is not None:
            self._metrics.observe_caption(lane, time.monotonic() - item.accepted)
        if item.future is not None:
            if answer(item.future, outcome):
                self.throughput.add(1)
        elif isinstance(outcome, PhicapError):
            self._finished.append(Outcome(item, error=outcome).finished())
        else:
            self._finished.append(Outcome(item, caption=outcome).finished())

    def _flush_finished(self) -> None:
        """Rows that finished in the same step reach the writer as one group: one journal commit."""
        if self._finished:
            self.writer.submit(self._finished)
            self._finished = []

    def _answer_in_flight(self, error: PhicapError) -> None:
        """Socket requests on the broken model get an answer; background jobs stay claimed."""
        with self._cond:
            requests = self._lanes.requests_in_flight()
        for item in requests:
            assert item.future is not None
            answer(item.future, error)

    def _recorded(self, job_ids: list[int], captioned: int) -> None:
        """The writer settled these jobs in the journal: they are no longer claimed."""
        with self._cond:
            self._lanes.settled(job_ids)
        self.throughput.add(captioned)
        self.backlog_rate.add(captioned)
        self.feeder.wake()

    def _observe_failure(self, lane: str, error: PhicapError) -> None:
        if self._metrics is not None:
            self._metrics.observe_failure(lane, error.code)

    @property
    def recent_failures(self) -> collections.deque[dict[str, Any]]:
        return self.writer.recent_failures

    # -- introspection -------------------------------------------------------------------------

    def lanes(self) -> dict[str, int]:
        with self._cond:
            return self._lanes.counts()

    def set_settings(self, settings: Settings) -> None:
        """A configuration reload: the live settings (roots, policies) for the jobs to come."""
        self.settings = settings
        self.writer.settings = settings
        self.feeder.configure(settings, max(settings.scheduler.prefetch, self.max_batch))
        if self.streams:
            self.reserve = min(settings.scheduler.interactive_slots, self.max_batch - 1)
        self.window = settings.scheduler.batch_window_ms / 1000.0
        self.store.max_attempts = settings.scheduler.max_attempts
        self.store.backoff_seconds = settings.scheduler.retry_backoff_seconds

    def healthy(self, stall_seconds: float) -> bool:
        """False when the model call has hung (a stuck CUDA kernel) or the worker thread died."""
        if self.broken is not None:
            return False
        busy = self.busy_since
        if busy is not None and time.monotonic() - busy > stall_seconds:
            return False
        worker = next((t for t in self._threads if t.name == "phicapd-gpu"), None)
        return worker is None or worker.is_alive() or self._stopping.is_set()


def _name(item: Item) -> str:
    """How an image is named in its errors."""
    return str(item.job.path) if item.job is not None else "request"
