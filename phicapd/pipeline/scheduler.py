r"""The scheduler: two lanes into one GPU worker, with decoding ahead of it and writing behind it.

    journal --claim--> decode pool --> background lane --+
                                                          +--> GPU worker --> writer --> sidecar + journal
    socket  --------> decode pool --> interactive lane --+                \--> reply to the client

* One thread, the GPU worker, owns the ``Captioner`` and streams work into it: the backend asks
  for more whenever it has free rows (the native engine asks before every decode step), and
  each caption comes back the moment it is done. Interactive requests are always taken first,
  and ``interactive_slots`` rows are kept free of background work, so a caption asked for over
  the socket joins the running batch at the next step instead of waiting for it, however long
  the backlog. (A batch-only backend runs batch after batch; a request then waits for at most
  the batch on the model.) When idle, the first take waits a short window to fill a batch.
* Images are decoded (and fingerprinted) in a CPU pool ahead of the worker; the daemon hands
  each one to a decode worker process (``decode_pool``), so a file that crashes or hangs a C
  decoder fails alone (``image_crashed_decoder``, an attempt; parked after ``max_attempts``)
  and costs a worker, never the daemon. At most ``prefetch`` background images are claimed
  from the journal at once; the rest of the backlog waits on disk, so memory is bounded
  whatever its size.
* The writer (``writer.py``) writes sidecars and records results in the journal in groups, so
  fsyncs never hold up the GPU. It pushes back: background rows go on the model only while
  the captions waiting for the writer plus the background rows on the model fit one batch
  (``max_batch``), so a writer slower than the model (embed, XMP) holds the GPU instead of
  piling up captions that only memory holds and that a crash would send to the model again.
  The model and the writer still overlap by a batch: one is written while the next is made.
* Every caption is cleaned and checked once, as it is delivered (``caption_text``): too long,
  or blank after cleaning, it is that image's failure; otherwise the writer, the journal and the
  socket reply all get the same cleaned text.
* When the model fails everything in flight at once, those images are retried one by one, so
  one bad image cannot fail its neighbours.
* An image that was on the model when the daemon died (``interrupted``) runs alone, once the
  rows around it drained: if it is what crashes the process, only it is blamed again, and
  its batch-mates are not parked with it.
* Likewise for the decode pool: each image is marked while it is decoded and prepared for the
  backend (``JobStore.mark_decoding``), so an image that crashes the daemon's own process there
  (the backend's preprocessing is C code over its pixels too) is blamed at the next start
  (``interrupted_decoding``). Such an image is decoded alone: no other decode
  runs and no background job is on the model or waiting for its journal record, so a second
  crash blames only it, and it is parked after ``max_attempts`` without being decoded again.
* A broken model (a CUDA fault, or ``BREAKER`` images in a row failing alone and then a plain
  gray probe image failing too) is not the images' fault: the worker stops, the images on the
  model stay "running" in the journal (the restart counts the attempt, as after a crash, so an
  image that breaks the GPU is parked in the end) and the daemon exits for systemd to restart
  it, instead of failing the backlog.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd.caption_text import checked_caption
from phicapd.captioner import Caption, Captioner, CaptionRequest
from phicapd.config import Settings, WatchRoot
from phicapd.errors import INTERRUPTED_DECODING, CaptionError, PhicapError
from phicapd.log import get_logger
from phicapd.metrics import DaemonMetrics
from phicapd.outputs.detect import already_captioned, staged_fingerprint
from phicapd.pipeline.decode import DecodeBytes, Decoded, DecodeFile, fingerprint_of
from phicapd.pipeline.jobs import Job, JobStore
from phicapd.pipeline.progress import BusyRate
from phicapd.pipeline.writer import Finished, SidecarWriter

log = get_logger(__name__)


ListImages = Callable[[Path, WatchRoot], list[str]]

#: Failures in a row, each of one image alone, after which a probe image asks whether the model
#: or the images are broken (a backlog's tail can be all bad images).
BREAKER = 4
#: Threads decoding socket requests, apart from the backlog's decode pool so they never queue behind it.
INTERACTIVE_DECODERS = 4
#: The window of the background caption rate behind the backlog's ETA (``pipeline.progress``).
PROGRESS_WINDOW_SECONDS = 300.0


@dataclass(slots=True)
class _Item:
    """One image on its way through the worker: a background job or an interactive request."""

    request: CaptionRequest
    job: Job | None = None
    root: WatchRoot | None = None
    decoded: Decoded | None = None
    future: Future[Caption] | None = None
    accepted: float = field(default_factory=time.monotonic)
    batch_size: int = 0


@dataclass(slots=True)
class _Outcome:
    """What the model made of one item."""

    item: _Item
    caption: Caption | None = None
    error: PhicapError | None = None

    def finished(self) -> Finished:
        item = self.item
        assert item.job is not None
        return Finished(
            item.job,
            item.root,
            item.decoded,
            item.request.prompt,
            item.accepted,
            item.batch_size,
            self.caption,
            self.error,
        )


class Throughput:
    """Captions per second over a sliding window, for status and the watchdog's STATUS= line."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._events: collections.deque[float] = collections.deque()
        self.total = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += n
            self._events.extend([now] * n)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0] < now - self.window:
            self._events.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._events:
                return 0.0
            return len(self._events) / self.window


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        captioner: Captioner,
        store: JobStore,
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
        self._decode_file = decode_file
        self._decode_bytes = decode_bytes
        self._list_images = list_images
        self._roots = {r.path: r for r in settings.watch}
        self.max_batch = max(1, min(settings.model.max_batch or captioner.max_batch, captioner.max_batch))
        # Rows held free for interactive requests; only a continuous batcher can use them mid-batch.
        self.streams = captioner.continuous_batching
        self.reserve = min(settings.scheduler.interactive_slots, self.max_batch - 1) if self.streams else 0
        self.prefetch = max(settings.scheduler.prefetch, self.max_batch)
        self.window = settings.scheduler.batch_window_ms / 1000.0

        self._cond = threading.Condition()
        self._interactive: collections.deque[_Item] = collections.deque()
        self._background: collections.deque[_Item] = collections.deque()
        self._suspects: collections.deque[_Item] = collections.deque()  # interrupted: run alone
        self._decoding = 0  # background images claimed and not yet in the lane
        # The decode gate: images being decoded now, and images interrupted while decoding last
        # time that wait to be (or are being) decoded alone. While one does, nothing else is
        # decoded and no background job goes on the model, so a crash blames only it.
        self._decodes_active = 0
        self._alone = 0
        self._on_model: set[int] = set()  # background jobs marked running and not yet recorded
        # Jobs claimed from the journal and not yet recorded as finished. They stay "pending" on
        # disk until their batch starts, so a crash only counts an attempt against the images
        # that were actually on the model.
        self._claimed: set[int] = set()
        self._waiting: set[Future[Caption]] = set()  # interactive requests not answered yet
        self._in_flight: dict[int, _Item] = {}  # taken by the model, not delivered; by id(request)
        self._finished: list[Finished] = []  # background results, handed to the writer at the next take
        self._wake_feeder = threading.Event()
        self._stopping = threading.Event()
        self._paused = False
        self._pool = ThreadPoolExecutor(settings.scheduler.decode_workers, thread_name_prefix="phicapd-decode")
        self._interactive_pool = ThreadPoolExecutor(
            min(INTERACTIVE_DECODERS, settings.scheduler.decode_workers), thread_name_prefix="phicapd-decode-rq"
        )
        self.writer = SidecarWriter(
            settings, store, captioner.identity, list_images, self._recorded, on_taken=self._writer_took
        )
        self._threads: list[threading.Thread] = []

        self.throughput = Throughput()
        #: Background captions only, over a longer window: the rate the backlog's ETA is based on.
        self.backlog_rate = BusyRate(PROGRESS_WINDOW_SECONDS)  # the ETA's rate: captions per busy second
        self.batches = 0
        self.busy_since: float | None = None
        self.last_progress = time.monotonic()
        self.broken: PhicapError | None = None  # set once the model is unusable; the daemon then exits
        self._failures_in_a_row = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (
            ("phicapd-gpu", self._worker_loop),
            ("phicapd-feeder", self._feeder_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.writer.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop taking work, let the batch on the GPU finish (up to ``grace`` s), hand the rest back."""
        self._stopping.set()
        self.captioner.stopping()  # a backend holding requests it cannot run now (no endpoint up) lets them go
        self._wake_feeder.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.writer.stop(max(1.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._interactive_pool.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            waiting = list(self._waiting)
            self._interactive.clear()
            self._background.clear()
            self._suspects.clear()
            self._on_model.clear()
            unfinished = set(self._claimed)
            self._claimed.clear()
            if self.broken is not None:
                # On the model when it broke: left "running", so the restart counts an attempt.
                unfinished -= {i.job.id for i in self._in_flight.values() if i.job is not None}
        for future in waiting:  # requests still decoding or queued: answer them now
            if not future.done():
                future.set_exception(PhicapError("the daemon is shutting down", code="shutting_down", retryable=True))
        if unfinished:
            self.store.release(unfinished)
            log.info("handed back unfinished jobs", jobs=len(unfinished))

    # -- inputs --------------------------------------------------------------------------------

    def notify_work(self) -> None:
        """New pending jobs are in the journal."""
        self._wake_feeder.set()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake_feeder.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def submit(
        self, data: bytes, *, name: str, prompt: str | None = None, max_new_tokens: int | None = None
    ) -> Future[Caption]:
        """Caption image bytes in the interactive lane. The future fails with a ``PhicapError``."""
        future: Future[Caption] = Future()
        with self._cond:
            self._waiting.add(future)
        future.add_done_callback(self._forget_future)
        if self._stopping.is_set():
            future.set_exception(PhicapError("the daemon is shutting down", code="shutting_down", retryable=True))
            return future
        model = self.settings.model
        request_prompt = prompt or model.prompt
        tokens = max_new_tokens or model.max_new_tokens

        def decode() -> None:
            if future.cancelled():
                return
            try:
                item = _Item(self._request(self._decode_bytes(data, name), request_prompt, tokens), future=future)
            except PhicapError as e:
                self._observe_failure("interactive", e)
                future.set_exception(e)
                return
            except Exception as e:  # a decoder bug must not take the request down silently
                log.exception("decoder crashed", input=name)
                error = PhicapError(f"{name}: cannot decode image: {e}", code="image_corrupt")
                self._observe_failure("interactive", error)
                future.set_exception(error)
                return
            with self._cond:
                self._interactive.append(item)
                self._cond.notify_all()

        self._interactive_pool.submit(decode)
        return future

    def _forget_future(self, future: Future[Caption]) -> None:
        with self._cond:
            self._waiting.discard(future)

    # -- feeder: journal -> decode pool -> background lane -------------------------------------

    def _feeder_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                held = self._decoding + len(self._background) + len(self._suspects)
            # Refill in large steps (below half full, up to full): one journal query per
            # step rather than one per finished batch.
            room = self.prefetch - held if held <= self.prefetch // 2 else 0
            if self._paused or room <= 0:
                self._wake_feeder.wait(0.5)
                self._wake_feeder.clear()
                continue
            try:
                with self._cond:
                    exclude = set(self._claimed)
                jobs = self.store.claim(room, exclude)
            except Exception:
                log.exception("cannot claim jobs from the journal")
                self._wake_feeder.wait(1.0)
                continue
            if not jobs:
                self._wake_feeder.wait(self._idle_wait())
                self._wake_feeder.clear()
                continue
            with self._cond:
                self._decoding += len(jobs)
                self._claimed.update(j.id for j in jobs)
            for job in jobs:
                self._pool.submit(self._decode_job, job)

    def _request(self, image: Image.Image, prompt: str, max_new_tokens: int) -> CaptionRequest:
        """Runs in the decode pool: the backend's CPU preprocessing happens here, off the GPU thread."""
        prepared = self.captioner.prepare(image)
        # Held until the model takes it: 64 MP photos x ``prefetch`` would be gigabytes.
        kept = self.captioner.kept_image_side
        if prepared is not None and max(image.size) > kept:
            # An integer box reduction: 17 ms for 12 MP where copy + thumbnail took 165 ms.
            image = image.reduce(-(-max(image.size) // kept))
        return CaptionRequest(image, prompt, max_new_tokens, prepared)

    def _idle_wait(self) -> float:
        nxt = self.store.next_wakeup()
        if nxt is None:
            return 5.0
        return min(5.0, max(0.05, nxt - time.time()))

    def _decode_job(self, job: Job) -> None:
        root = self._roots.get(job.root)
        item: _Item | None = None
        error: PhicapError | None = None
        try:
            if root is None:
                raise PhicapError(f"{job.path}: its watch root {job.root} is no longer configured", code="root_removed")
            now = staged_fingerprint(job, self.settings, root, fingerprint_of)
            if now is not None and job.caption is not None and job.sha256:
                # Its caption is in the journal (staged, and the daemon stopped while its files
                # were written; or a backfill): write its files from there, not from the model.
                caption = Caption(job.caption, 0, backend=job.backend, endpoint=job.endpoint, model=job.model)
                decoded = Decoded(None, job.sha256, now)  # type: ignore[arg-type]  # no pixels needed
                prompt = job.prompt or ""
                self._to_writer(Finished(job, root, decoded, prompt, time.monotonic(), caption=caption, staged=True))
                return
            kept = already_captioned(job, self.settings, root, self.store.claims_near, self._list_images)
            if kept is not None:
                # Its sidecar appeared while it waited (phicapctl, a hand-written caption) or was
                # written just before a crash: done, not captioned twice. Recorded by the writer,
                # which retries a journal that fails.
                self._to_writer(Finished(job, root, None, "", time.monotonic(), skipped=True, claim=kept))
                return
            if job.attempts >= self.store.max_attempts:
                # Interrupted by a crash (or failed) every time it was tried: likely what crashes us.
                if _decode_suspect(job):
                    raise PhicapError(
                        f"{job.path}: the daemon crashed while decoding this image, {job.attempts} times;"
                        " it is not decoded again (a file that crashes the image decoder?)",
                        code=INTERRUPTED_DECODING,
                        retryable=False,
                    )
                raise PhicapError(
                    f"{job.path}: the daemon stopped while captioning this image, {job.attempts} times",
                    code="interrupted",
                    retryable=False,
                )
            with self._decode_slot(alone=_decode_suspect(job)):
                self._mark_decoding(job, True)
                try:
                    decoded = self._decode_file(job.path)
                    prompt = self.settings.prompt_for(root)
                    # The backend's preprocessing runs C code over the pixels too: inside the mark.
                    request = self._request(decoded.image, prompt, self.settings.model.max_new_tokens)
                finally:
                    self._mark_decoding(job, False)
            # The full-size image is not kept: the writer needs only the hash and fingerprint.
            item = _Item(request, job=job, root=root, decoded=replace(decoded, image=request.image))
        except _Stopping:
            with self._cond:
                self._decoding -= 1
            return  # still claimed and pending: ``stop`` hands it back
        except PhicapError as e:
            error = e
        except Exception as e:
            log.exception("decoder crashed", path=str(job.path))
            error = PhicapError(f"{job.path}: cannot decode image: {e}", code="image_corrupt")
        with self._cond:
            self._decoding -= 1
            if item is not None:
                (self._suspects if _suspect(job) else self._background).append(item)
                self._cond.notify_all()
        if error is not None and error.code == "image_missing":
            # Deleted before its turn: nothing to caption and nothing to report.
            self.store.forget(job.path)
            with self._cond:
                self._claimed.discard(job.id)
            log.info("job", path=str(job.path), outcome="gone")
        elif error is not None:
            self._observe_failure("background", error)
            self.writer.submit([Finished(job, root, None, "", time.monotonic(), error=error)])
        self._wake_feeder.set()

    def _to_writer(self, finished: Finished) -> None:
        """A claimed job that needs no model after all goes straight to the writer."""
        with self._cond:
            self._decoding -= 1
        self.writer.submit([finished])
        self._wake_feeder.set()

    @contextlib.contextmanager
    def _decode_slot(self, *, alone: bool) -> Iterator[None]:
        """Decode one image, or with ``alone`` one that was being decoded when the daemon died:
        that waits until no other decode runs and no background job is on the model or waiting
        for its journal record (``_take`` starts none meanwhile, other decodes wait behind it),
        so if it crashes the process again, the next start blames it and nothing else."""
        with self._cond:
            if alone:
                self._alone += 1
            try:
                while (self._decodes_active > 0 or self._on_model) if alone else self._alone > 0:
                    if self._stopping.is_set():
                        raise _Stopping
                    self._cond.wait(0.5)
            except BaseException:
                if alone:
                    self._alone -= 1
                    self._cond.notify_all()
                raise
            self._decodes_active += 1
        try:
            yield
        finally:
            with self._cond:
                self._decodes_active -= 1
                if alone:
                    self._alone -= 1
                self._cond.notify_all()

    def _mark_decoding(self, job: Job, decoding: bool) -> None:
        try:
            self.store.mark_decoding(job.id, decoding)
        except OSError as e:
            # The state directory is failing (full): decode anyway; only a crash of the process
            # during this decode would then go unblamed.
            log.warning("cannot mark the image as being decoded", path=str(job.path), error=str(e))

    # -- the GPU worker ------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while self._wait_for_work():
            self.busy_since = time.monotonic()  # the model's heartbeat: renewed on every take/deliver
            self.backlog_rate.busy()
            try:
                self.captioner.stream(self._take, self._deliver)
            except Exception as e:
                with self._cond:
                    leftovers = list(self._in_flight.values())
                if _is_model_fault(e):
                    self._break(_as_phicap_error(e, None))
                elif leftovers:
                    log.warning("the model failed, retrying its images one by one", images=len(leftovers), error=str(e))
                for item in leftovers:
                    if self.broken is not None:
                        break
                    outcome = self._caption_one(item)
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
            # Background work waits while an image is decoded alone (``_decode_slot``) and
            # while the writer is a batch behind (``_writer_room``).
            while not self._interactive and (
                self._paused or self._alone or self._writer_room() <= 0 or not (self._background or self._suspects)
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
        with self._cond:
            room = min(room, self.max_batch - len(self._in_flight))
            if idle and room > 0:
                # Nothing is running: wait a short window for a fuller first batch. A streaming
                # model takes later socket requests at its next step, so one never waits for more.
                deadline = now + self.window
                while (
                    len(self._interactive) + (0 if self._paused else len(self._background)) < room
                    and (self._decoding > 0 or (self._interactive and not self.streams))
                    and not self._stopping.is_set()
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._stopping.is_set() or self.broken is not None or room <= 0:
                # Stopping: the rows on the model finish, nothing new starts; queued requests
                # get a retryable "shutting_down" and queued jobs go back to the journal.
                return []
            items: list[_Item] = []
            while self._interactive and len(items) < room:
                item = self._interactive.popleft()
                if item.future is None or not item.future.cancelled():
                    items.append(item)
            background_room = room - len(items) - self.reserve
            if idle and not items:
                background_room = max(background_room, 1)  # a lone background image may use any row
            if 0 < self._interactive_rows(items) <= self.reserve:
                # Every background prefill would stall a socket request's decode steps: none start
                # until it is answered (the rows already running carry on). More socket requests
                # than reserved rows is bulk work (caption-dir): the background fills in beside it.
                background_room = 0
            background_room = min(background_room, self._writer_room())
            if self._alone:
                # An image is decoded alone: no background job goes on the model meanwhile.
                background_room = 0
            elif background_room <= 0:
                pass  # the writer is a batch behind: not even an interrupted image goes on now
            elif not self._paused and (self._suspects or any(_suspect(i.job) for i in self._in_flight.values())):
                # An interrupted image runs alone: no new background rows until the model is
                # empty, then it, then nothing beside it until it is done.
                background_room = 0
                if self._suspects and not self._in_flight and not items:
                    items.append(self._suspects.popleft())
            while not self._paused and self._background and background_room > 0:
                items.append(self._background.popleft())
                background_room -= 1
            rows = len(self._in_flight) + len(items)
            for item in items:
                item.batch_size = rows
                self._in_flight[id(item.request)] = item
                if item.job is not None:
                    self._on_model.add(item.job.id)
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
        on_model = sum(1 for i in self._in_flight.values() if i.job is not None)
        return self.max_batch - self.writer.waiting - len(self._finished) - on_model

    def _writer_took(self) -> None:
        """The writer took its queue up: the worker may be waiting for that."""
        with self._cond:
            self._cond.notify_all()

    def _interactive_rows(self, taking: list[_Item]) -> int:
        return sum(1 for i in (*self._in_flight.values(), *taking) if i.future is not None)

    def _deliver(self, request: CaptionRequest, outcome: Caption | PhicapError) -> None:
        """One image is done (or failed on its own): answer its client or hand it to the writer."""
        self.last_progress = self.busy_since = time.monotonic()
        with self._cond:
            item = self._in_flight.pop(id(request))
        if isinstance(outcome, Caption):
            # Once, for every backend and both lanes, before any output or reply holds it; before
            # any prefix/suffix, so a blank model text is a failure however it would be decorated.
            name = str(item.job.path) if item.job is not None else "request"
            model = self.settings.model
            outcome = checked_caption(
                outcome, max_new_tokens=request.max_new_tokens, strip_openers=model.strip_openers, name=name
            )
        if not isinstance(outcome, PhicapError):
            self._failures_in_a_row = 0
        lane = "interactive" if item.future is not None else "background"
        if isinstance(outcome, PhicapError):
            self._observe_failure(lane, outcome)
        elif self._metrics is not None:
            self._metrics.observe_caption(lane, time.monotonic() - item.accepted)
        result = _Outcome(item, error=outcome) if isinstance(outcome, PhicapError) else _Outcome(item, caption=outcome)
        if item.future is not None:
            try:
                if result.error is not None:
                    item.future.set_exception(result.error)
                else:
                    item.future.set_result(outcome)
                    self.throughput.add(1)
            except InvalidStateError:
                pass  # cancelled by its client, or already answered by stop()
        else:
            self._finished.append(result.finished())

    def _flush_finished(self) -> None:
        """Rows that finished in the same step reach the writer as one group: one journal commit."""
        if self._finished:
            self.writer.submit(self._finished)
            self._finished = []

    def _caption_one(self, item: _Item) -> Caption | PhicapError:
        """One image alone, after the batch it was in failed. Counts towards the breaker."""
        self.busy_since = time.monotonic()
        try:
            captions = self.captioner.caption([item.request])
            if len(captions) != 1:
                raise CaptionError(f"captioner returned {len(captions)} captions for 1 image")
            return captions[0]
        except Exception as e:
            error = _as_phicap_error(e, item)
            if _is_model_fault(e):
                self._break(error)
            elif error.retryable:  # a non-retryable error is the request's own (a bad prompt)
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= BREAKER:
                    self._probe(error)
            return error

    def _probe(self, last: PhicapError) -> None:
        """Caption a plain gray image: if even that fails, the model is broken, not the images."""
        image = Image.new("RGB", (64, 48), (127, 127, 127))
        try:
            self.captioner.caption([self._request(image, self.settings.model.prompt, 2)])
        except Exception as e:
            self._break(CaptionError(f"{BREAKER} images in a row and a probe image failed: {e}; before: {last}"))
        else:
            log.info("the model captions a probe image: the failing images are at fault", failures=BREAKER)
            self._failures_in_a_row = 0

    def _break(self, error: PhicapError) -> None:
        """The model is unusable: take nothing more; the daemon sees ``broken`` and exits."""
        if self.broken is None:
            log.error("the model is broken; stopping for a restart", code=error.code, error=str(error))
            self.broken = PhicapError(f"the model is broken: {error}", code="model_broken", retryable=True)
            self._wake_feeder.set()
            with self._cond:
                self._cond.notify_all()

    def _answer_in_flight(self, error: PhicapError) -> None:
        """Socket requests on the broken model get an answer; background jobs stay claimed."""
        with self._cond:
            requests = [i for i in self._in_flight.values() if i.future is not None]
            for item in requests:
                del self._in_flight[id(item.request)]
        for item in requests:
            assert item.future is not None
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(error)

    def _recorded(self, job_ids: list[int], captioned: int) -> None:
        """The writer settled these jobs in the journal: they are no longer claimed."""
        with self._cond:
            self._claimed.difference_update(job_ids)
            self._on_model.difference_update(job_ids)
            self._cond.notify_all()  # an image waiting to be decoded alone may go now
        self.throughput.add(captioned)
        self.backlog_rate.add(captioned)
        self._wake_feeder.set()

    def _observe_failure(self, lane: str, error: PhicapError) -> None:
        if self._metrics is not None:
            self._metrics.observe_failure(lane, error.code)

    @property
    def recent_failures(self) -> collections.deque[dict[str, Any]]:
        return self.writer.recent_failures

    # -- introspection -------------------------------------------------------------------------

    def lanes(self) -> dict[str, int]:
        with self._cond:
            return {
                "interactive": len(self._interactive),
                "background_ready": len(self._background),
                "interrupted_ready": len(self._suspects),
                "decoding": self._decoding,
                "claimed": len(self._claimed),
            }

    def set_settings(self, settings: Settings) -> None:
        """A configuration reload: the live settings (roots, policies) for the jobs to come."""
        self.settings = settings
        self.writer.settings = settings
        self._roots = {r.path: r for r in settings.watch}
        if self.streams:
            self.reserve = min(settings.scheduler.interactive_slots, self.max_batch - 1)
        self.prefetch = max(settings.scheduler.prefetch, self.max_batch)
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


class _Stopping(Exception):
    """The scheduler stops while a decode waits at the gate."""


def _suspect(job: Job | None) -> bool:
    """Interrupted on the model last time: it may be what brings the process down."""
    return job is not None and job.error_code == "interrupted"


def _decode_suspect(job: Job) -> bool:
    """Interrupted while it was being decoded last time: it may crash the decoder."""
    return job.error_code == INTERRUPTED_DECODING


def _is_model_fault(e: BaseException) -> bool:
    """A fault of the model or device itself (a sticky CUDA error), not of the images on it."""
    return isinstance(e, PhicapError) and e.code == "model_broken"


def _as_phicap_error(e: Exception, item: _Item | None) -> PhicapError:
    name = str(item.job.path) if item is not None and item.job else "request"
    if isinstance(e, PhicapError):
        return e
    return CaptionError(f"{name}: captioning failed: {type(e).__name__}: {e}")
