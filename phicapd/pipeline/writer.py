"""The writer: finished background captions -> sidecars on disk -> the journal, in groups.

The sidecar is the truth for "done", so the order matters: a group's sidecars are written
atomically first (parallel temp-file fsyncs, renames, one fsync per directory), and only then
is the group recorded in one journal transaction. A crash in between leaves a sidecar whose job
is still open; the job is then recognised as already captioned instead of being captioned twice.

Each image is named with the journal's claims (``pipeline.sidecar.Claims``), and the sidecar
it gets, written or kept, is claimed for it in the group's transaction: a sidecar that is
another image's is never written over. A sidecar that the ``existing`` policy keeps and that
appeared while its image was on the model (phicapctl, a person) is not replaced: the job is
done without it. A group whose journal
transaction fails stays claimed and is written again after a back-off, so a full disk neither
loses it nor sends its images round the model again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phicapd.captioner import Caption, decorate
from phicapd.config import Settings, WatchRoot
from phicapd.errors import PhicapError
from phicapd.log import get_logger
from phicapd.pipeline.decode import Decoded, fingerprint_of
from phicapd.pipeline.jobs import Failure, Job, JobStore, Success
from phicapd.pipeline.sidecar import Claims, SiblingCache, policy_keeps, write_sidecars

log = get_logger(__name__)

#: Sidecar writes in flight at once. Each one waits on its own fsync (without the GIL), and the
#: filesystem commits concurrent fsyncs together: on ext4, 16 in flight wrote a group's sidecars
#: about twice as fast as 4.
IO_THREADS = 16
#: Back-off of a group whose journal write failed: doubling from the first to the last.
RETRY_SECONDS = (1.0, 60.0)


@dataclass(slots=True)
class Finished:
    """A background job back from the model, or one that failed before it got there."""

    job: Job
    root: WatchRoot | None
    decoded: Decoded | None
    prompt: str
    accepted: float
    batch_size: int = 0
    caption: Caption | None = None
    error: PhicapError | None = None
    skipped: bool = False  # its sidecar is kept as it is (the policy): done without a caption
    claim: str | None = None  # the sidecar base named for it (``pipeline.sidecar.Claims``)


class SidecarWriter:
    """One thread that drains finished jobs; ``on_recorded`` hears which job ids are settled."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        model_identity: str,
        list_images: Callable[[Path, WatchRoot], list[str]],
        on_recorded: Callable[[list[int], int], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.model_identity = model_identity
        self.backend = settings.model.backend
        self._on_recorded = on_recorded
        self._siblings = SiblingCache(list_images)
        self._io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="phicapd-write")
        self._queue: collections.deque[Finished] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="phicapd-writer", daemon=True)
        self.recent_failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        #: Captions written since start by (backend, endpoint, model), for status.
        self.by_source: collections.Counter[tuple[str, str | None, str]] = collections.Counter()

    def start(self) -> None:
        self._thread.start()

    def submit(self, finished: list[Finished]) -> None:
        with self._cond:
            self._queue.extend(finished)
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        """Write what was submitted (within ``timeout``), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        self._io_pool.shutdown(wait=True)

    def _loop(self) -> None:
        delay = RETRY_SECONDS[0]
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return
                    self._cond.wait(0.5)
                group = list(self._queue)
                self._queue.clear()
            try:
                self._write(group)
                delay = RETRY_SECONDS[0]
            except Exception:
                # The journal is failing (disk full, I/O error). The jobs stay claimed, so the
                # feeder does not hand them to the model again; their sidecars are on disk and
                # rewriting them is cheap. Stopping gives up: the next start recovers them.
                log.exception("cannot record a group of jobs; trying again", jobs=len(group), seconds=delay)
                with self._cond:
                    if self._closing:
                        return
                    self._queue.extendleft(reversed(group))
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_SECONDS[1])

    def _write(self, group: list[Finished]) -> None:
        written = self._write_sidecars(group)
        successes: list[Success] = []
        failures: list[Failure] = []
        skipped: list[int] = []
        for f in group:
            if f.skipped:
                f.error = None  # a write that failed on an earlier try made it after all
                skipped.append(f.job.id)
            elif id(f) in written and f.decoded is not None:
                caption = f.caption
                successes.append(
                    Success(
                        f.job.id,
                        f.decoded.sha256,
                        (caption.model if caption is not None else None) or self.model_identity,
                        f.prompt,
                        str(written[id(f)]),
                        f.decoded.fingerprint,
                        backend=(caption.backend if caption is not None else None) or self.backend,
                        endpoint=caption.endpoint if caption is not None else None,
                    )
                )
            else:
                f.error = f.error or PhicapError(f"{f.job.path}: no caption", code="caption_failed")
                failures.append(Failure(f.job.id, f.error.code, str(f.error), f.error.retryable))
        claims = [(f.job.path, f.claim) for f in group if f.claim is not None and (f.skipped or id(f) in written)]
        parked = {j.id for j in self.store.finish_many(successes, failures, skipped, claims)}
        self.by_source.update((s.backend or "", s.endpoint, s.model) for s in successes)
        self._on_recorded([f.job.id for f in group], len(successes))
        self._log(group, parked)

    def _write_sidecars(self, group: list[Finished]) -> dict[int, Path]:
        """Write the group's sidecars; returns id(finished) -> sidecar path for those written."""
        planned: list[tuple[Finished, Path, str]] = []
        for f in group:
            if f.error is not None or f.caption is None or f.root is None or f.decoded is None:
                continue
            if fingerprint_of(f.job.path) != f.decoded.fingerprint:
                f.error = PhicapError(
                    f"{f.job.path}: the image changed while it was captioned", code="image_changed", retryable=True
                )
                continue
            directory = f.job.path.parent
            claims = Claims(self.store.claims_near(f.job.path), directory)
            base = self._siblings.get(directory, f.root).base_for(f.job.path.name, claims)
            sidecar = directory / (base + self.settings.sidecar.extension)
            f.claim = base
            if self._kept(f, sidecar):
                f.skipped = True
                continue
            planned.append((f, sidecar, decorate(f.caption.text, f.root.prefix, f.root.suffix)))
        # only-missing: an existing sidecar wins even if it appears while ours is being written.
        keep = {path for f, path, _ in planned if not f.job.force and self._policy(f) == "only-missing"}
        directories = {path.parent: self._siblings.unchanged(path.parent) for _, path, _ in planned}
        errors = write_sidecars([(path, text) for _, path, text in planned], self._io_pool, keep)
        for directory, unchanged in directories.items():
            self._siblings.wrote(directory, unchanged_before=unchanged)
        written: dict[int, Path] = {}
        for (f, path, _), error in zip(planned, errors, strict=True):
            if error is None:
                written[id(f)] = path
            elif isinstance(error, FileExistsError) and path in keep:
                f.skipped = True
            else:
                f.error = PhicapError(
                    f"{f.job.path}: cannot write its sidecar {path}: {error.strerror or error}",
                    code="sidecar_write_failed",
                    retryable=True,
                )
        return written

    def _policy(self, f: Finished) -> str:
        assert f.root is not None
        return self.settings.existing_policy(f.root)

    def _kept(self, f: Finished, sidecar: Path) -> bool:
        """Does the policy keep the sidecar as it is now? It was not, when the job was queued,
        so one that is kept now appeared while the image was on its way (phicapctl, a person).
        The image's mtime is its fingerprint's, which was just checked against the file."""
        assert f.decoded is not None
        return not f.job.force and policy_keeps(self._policy(f), f.decoded.fingerprint.mtime_ns, sidecar)

    def _log(self, group: list[Finished], parked: set[int]) -> None:
        """One canonical line per finished job."""
        now = time.monotonic()
        for f in group:
            fields: dict[str, Any] = {
                "path": str(f.job.path),
                "outcome": "failed" if f.error else "skipped" if f.skipped else "done",
                "duration_ms": round((now - f.accepted) * 1000, 1),
                "batch": f.batch_size,
            }
            if f.caption is not None:
                fields["tokens"] = f.caption.new_tokens
                if f.caption.endpoint is not None:
                    fields["endpoint"] = f.caption.endpoint
            if f.error is None:
                log.info("job", **fields)
                continue
            was_parked = f.job.id in parked
            self.recent_failures.append(
                {
                    "path": str(f.job.path),
                    "code": f.error.code,
                    "message": str(f.error),
                    "parked": was_parked,
                    "at": time.time(),
                }
            )
            log.warning("job", **fields, error=f.error.code, message=str(f.error), parked=was_parked)
