"""The feeder: journal --claim--> decode pool --> background lane.

At most ``prefetch`` background images are claimed from the journal at once; the rest of the
backlog waits on disk, so memory is bounded whatever its size. Each claimed image is decoded
(and fingerprinted) in a CPU pool ahead of the GPU worker; the daemon hands each one to a
decode worker process (``decode_pool``), so a file that crashes or hangs a C decoder fails
alone (``image_crashed_decoder``, an attempt; parked after ``max_attempts``) and costs a worker,
never the daemon. Decodes pass the crash-isolation gate (``decode_gate``).

A claimed job that needs no model after all goes straight to the writer: its caption is staged
in the journal, or its outputs are already there (the two checks are the scheduler's,
injected here as ``staged_fingerprint`` and ``already_captioned``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from PIL import Image

from phicapd.captioner import Caption, Captioner, CaptionRequest
from phicapd.config import Settings, WatchRoot
from phicapd.errors import INTERRUPTED_DECODING, PhicapError
from phicapd.log import get_logger
from phicapd.pipeline.decode import Decoded, DecodeFile
from phicapd.pipeline.decode_gate import DecodeGate, GateClosed, decode_suspect
from phicapd.pipeline.journal import Fingerprint, Job, Journal
from phicapd.pipeline.lanes import Item, Lanes
from phicapd.pipeline.writer import Finished

log = get_logger(__name__)

MakeRequest = Callable[[Image.Image, str, int], CaptionRequest]
Submit = Callable[[list[Finished]], None]


def prepare_request(captioner: Captioner, image: Image.Image, prompt: str, max_new_tokens: int) -> CaptionRequest:
    """Runs in the decode pools: the backend's CPU preprocessing happens here, off the GPU thread."""
    prepared = captioner.prepare(image)
    # Held until the model takes it: 64 MP photos x ``prefetch`` would be gigabytes.
    kept = captioner.kept_image_side
    if prepared is not None and max(image.size) > kept:
        # An integer box reduction: 17 ms for 12 MP where copy + thumbnail took 165 ms.
        image = image.reduce(-(-max(image.size) // kept))
    return CaptionRequest(image, prompt, max_new_tokens, prepared)


class Feeder:
    """Keeps the background lane filled from the journal, ``prefetch`` images ahead."""

    def __init__(
        self,
        settings: Settings,
        store: Journal,
        lanes: Lanes,
        gate: DecodeGate,
        *,
        prefetch: int,
        decode_file: DecodeFile,
        make_request: MakeRequest,
        staged_fingerprint: Callable[[Job, WatchRoot], Fingerprint | None],
        already_captioned: Callable[[Job, WatchRoot], str | None],
        submit: Submit,
        observe_failure: Callable[[str, PhicapError], None],
        paused: Callable[[], bool],
        stopping: threading.Event,
    ) -> None:
        """``make_request``: the decoded image as a request (the backend's preprocessing);
        ``submit``: hands finished jobs to the writer."""
        self.store = store
        self._lanes = lanes
        self._gate = gate
        self.decode_file = decode_file
        self._make_request = make_request
        self._staged_fingerprint = staged_fingerprint
        self._already_captioned = already_captioned
        self._submit = submit
        self._observe_failure = observe_failure
        self._paused = paused
        self._stopping = stopping
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(settings.scheduler.decode_workers, thread_name_prefix="phicapd-decode")
        self.configure(settings, prefetch)

    def configure(self, settings: Settings, prefetch: int) -> None:
        """The live settings (roots, prompts) for the jobs claimed from now on."""
        self.settings = settings
        self.prefetch = prefetch
        self._roots = {r.path: r for r in settings.watch}

    def wake(self) -> None:
        """New pending jobs, room in the lanes, or a stop: look again now."""
        self._wake.set()

    def stop(self) -> None:
        """After ``stopping`` is set: wait for the decodes running, drop those not started."""
        self._wake.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self) -> None:
        """The feeder thread: claim, decode, repeat until stopping."""
        lanes = self._lanes
        while not self._stopping.is_set():
            with lanes.cond:
                held = lanes.held()
            # Refill in large steps (below half full, up to full): one journal query per
            # step rather than one per finished batch.
            room = self.prefetch - held if held <= self.prefetch // 2 else 0
            if self._paused() or room <= 0:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                with lanes.cond:
                    exclude = set(lanes.claimed)
                jobs = self.store.claim(room, exclude)
            except Exception:
                log.exception("cannot claim jobs from the journal")
                self._wake.wait(1.0)
                continue
            if not jobs:
                self._wake.wait(self._idle_wait())
                self._wake.clear()
                continue
            with lanes.cond:
                lanes.decoding += len(jobs)
                lanes.claimed.update(j.id for j in jobs)
            for job in jobs:
                self._pool.submit(self._decode_job, job)

    def _idle_wait(self) -> float:
        nxt = self.store.next_wakeup()
        if nxt is None:
            return 5.0
        return min(5.0, max(0.05, nxt - time.time()))

    def _decode_job(self, job: Job) -> None:
        root = self._roots.get(job.root)
        item: Item | None = None
        error: PhicapError | None = None
        try:
            if root is None:
                raise PhicapError(f"{job.path}: its watch root {job.root} is no longer configured", code="root_removed")
            now = self._staged_fingerprint(job, root)
            if now is not None and job.caption is not None and job.sha256:
                # Its caption is in the journal (staged, and the daemon stopped while its files
                # were written; or a backfill): write its files from there, not from the model.
                caption = Caption(job.caption, 0, backend=job.backend, endpoint=job.endpoint, model=job.model)
                decoded = Decoded(None, job.sha256, now)  # type: ignore[arg-type]  # no pixels needed
                prompt = job.prompt or ""
                self._to_writer(Finished(job, root, decoded, prompt, time.monotonic(), caption=caption, staged=True))
                return
            kept = self._already_captioned(job, root)
            if kept is not None:
                # Its sidecar appeared while it waited (phicapctl, a hand-written caption) or was
                # written just before a crash: done, not captioned twice. Recorded by the writer,
                # which retries a journal that fails.
                self._to_writer(Finished(job, root, None, "", time.monotonic(), skipped=True, claim=kept))
                return
            if job.attempts >= self.store.max_attempts:
                raise _parked(job)
            with self._gate.slot(alone=decode_suspect(job)):
                self._mark_decoding(job, True)
                try:
                    decoded = self.decode_file(job.path)
                    prompt = self.settings.prompt_for(root)
                    # The backend's preprocessing runs C code over the pixels too: inside the mark.
                    request = self._make_request(decoded.image, prompt, self.settings.model.max_new_tokens)
                finally:
                    self._mark_decoding(job, False)
            # The full-size image is not kept: the writer needs only the hash and fingerprint.
            item = Item(request, job=job, root=root, decoded=replace(decoded, image=request.image))
        except GateClosed:
            with self._lanes.cond:
                self._lanes.decoding -= 1
            return  # still claimed and pending: the scheduler's ``stop`` hands it back
        except PhicapError as e:
            error = e
        except Exception as e:
            log.exception("decoder crashed", path=str(job.path))
            error = PhicapError(f"{job.path}: cannot decode image: {e}", code="image_corrupt")
        with self._lanes.cond:
            self._lanes.decoded(item)
        if error is not None and error.code == "image_missing":
            # Deleted before its turn: nothing to caption and nothing to report.
            self.store.forget(job.path)
            with self._lanes.cond:
                self._lanes.claimed.discard(job.id)
            log.info("job", path=str(job.path), outcome="gone")
        elif error is not None:
            self._observe_failure("background", error)
            self._submit([Finished(job, root, None, "", time.monotonic(), error=error)])
        self._wake.set()

    def _to_writer(self, finished: Finished) -> None:
        """A claimed job that needs no model after all goes straight to the writer."""
        with self._lanes.cond:
            self._lanes.decoding -= 1
        self._submit([finished])
        self._wake.set()

    def _mark_decoding(self, job: Job, decoding: bool) -> None:
        try:
            self.store.mark_decoding(job.id, decoding)
        except OSError as e:
            # The state directory is failing (full): decode anyway; only a crash of the process
            # during this decode would then go unblamed.
            log.warning("cannot mark the image as being decoded", path=str(job.path), error=str(e))


def _parked(job: Job) -> PhicapError:
    """Interrupted by a crash (or failed) every time it was tried: likely what crashes us."""
    if decode_suspect(job):
        return PhicapError(
            f"{job.path}: the daemon crashed while decoding this image, {job.attempts} times;"
            " it is not decoded again (a file that crashes the image decoder?)",
            code=INTERRUPTED_DECODING,
            retryable=False,
        )
    return PhicapError(
        f"{job.path}: the daemon stopped while captioning this image, {job.attempts} times",
        code="interrupted",
        retryable=False,
    )
