"""The daemon's side of the decode workers (``decode_worker``): child processes that read and
decode every watched image and uploaded image, each supervised like the exiv2 worker.

A file that crashes or hangs a decoder costs a worker, not the daemon: the image fails alone
with ``image_crashed_decoder`` (retryable, so the journal counts it as an attempt and parks it
after ``max_attempts``), the worker is replaced on the next image and the other images decoded
meanwhile in the other workers are not touched. Before, each such crash was a crash of the
daemon, and two crashing files made six in seven starts: over systemd's start limit.

The pixels come back through a shared buffer per worker (``decode_buffer``): the worker writes
them once and the daemon copies them once into its image (the model path needs the full RGB
image). What the worker costs on top of decoding in the daemon: a request and an answer on a
pipe and that copy (docs/architecture.md). Background images and socket uploads have workers
of their own, so an upload never waits behind the backlog.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd.config import ImagingSettings
from phicapd.errors import IMAGE_CRASHED_DECODER, ImageError, PhicapError
from phicapd.log import get_logger
from phicapd.outputs.exiv2_supervisor import Supervisor, WorkerDied
from phicapd.pipeline.decode import YOUNG_SECONDS, Decoded
from phicapd.pipeline.decode_buffer import SharedPixels
from phicapd.pipeline.journal import Fingerprint

log = get_logger(__name__)

#: How a decode worker is started (the tests point it at one that crashes on purpose).
WORKER_COMMAND: list[str] = [sys.executable, "-m", "phicapd.pipeline.decode_worker"]
#: A decode not answered by then is a hang on a hostile file: the worker is killed. Generous
#: (the largest image ``max_pixels`` allows takes seconds) and, as a stop waits for the decodes
#: in progress, well within the unit's ``TimeoutStopSec``.
TIMEOUT_SECONDS = 30.0


class _Worker:
    """One supervised worker process and the buffer it shares with the daemon."""

    def __init__(self) -> None:
        self.fd = SharedPixels.create()
        self.pixels = SharedPixels(self.fd)
        self.supervisor = Supervisor(pass_fds=(self.fd,))

    def close(self) -> None:
        self.supervisor.close()
        self.pixels.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Workers:
    """A fixed set of workers, each lent to one caller at a time; started on first use."""

    def __init__(self, n: int) -> None:
        self.all = [_Worker() for _ in range(n)]
        self._free: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self.all:
            self._free.put(worker)

    @contextlib.contextmanager
    def lend(self) -> Any:
        worker = self._free.get()
        try:
            yield worker
        finally:
            self._free.put(worker)


class DecodeWorkers:
    """``decode_file`` and ``decode_bytes`` for the scheduler, run in worker processes:
    ``workers`` for the backlog and ``interactive`` for socket uploads."""

    def __init__(self, settings: ImagingSettings, workers: int, interactive: int) -> None:
        self.settings = settings
        self._background = _Workers(workers)
        self._interactive = _Workers(interactive)
        self._closed = False
        # Started now, so that the first image (a socket request) does not wait for a worker's
        # Python to start and import; one that dies is started again at its next image.
        for pool in (self._background, self._interactive):
            for worker in pool.all:
                worker.supervisor.start(self._command(worker))

    @property
    def died(self) -> int:
        """Decodes a worker died on (crashed, or hung and was killed) since start."""
        return sum(w.supervisor.died for pool in (self._background, self._interactive) for w in pool.all)

    def decode_file(self, path: Path) -> Decoded:
        request = {"op": "file", "path": str(path), "min_age_seconds": YOUNG_SECONDS}
        answer, image = self._decode(self._background, request, str(path))
        return Decoded(image, answer["sha256"], Fingerprint(answer["size"], answer["mtime_ns"], answer["inode"]))

    def decode_bytes(self, data: bytes, name: str) -> Image.Image:
        if len(data) > self.settings.max_file_bytes:
            raise ImageError(
                f"{name}: {len(data)} bytes is over the {self.settings.max_file_bytes}-byte limit",
                code="image_too_large",
            )
        return self._decode(self._interactive, {"op": "bytes", "size": len(data), "name": name}, name, data)[1]

    def close(self) -> None:
        """Let every worker go (a later decode fails with ``shutting_down``)."""
        self._closed = True
        for pool in (self._background, self._interactive):
            for worker in pool.all:
                worker.close()

    def _command(self, worker: _Worker) -> list[str]:
        limits = (worker.fd, self.settings.max_file_bytes, self.settings.max_pixels)
        return [*WORKER_COMMAND, *(str(n) for n in limits)]

    def _decode(
        self, pool: _Workers, request: dict[str, Any], name: str, data: bytes | None = None
    ) -> tuple[dict[str, Any], Image.Image]:
        with pool.lend() as worker:
            if self._closed:
                raise PhicapError("the daemon is shutting down", code="shutting_down", retryable=True)
            if data is not None:
                with worker.pixels.view(len(data)) as view:
                    view[:] = data
            try:
                answer = worker.supervisor.call(self._command(worker), request, TIMEOUT_SECONDS)
            except WorkerDied as e:
                log.warning("the image decoder died on a file", path=name, reason=e.reason)
                raise ImageError(
                    f"{name}: the image decoder {e.reason} on this file (a broken or hostile image?)",
                    code=IMAGE_CRASHED_DECODER,
                    retryable=True,
                ) from None
            error = answer.get("error")
            if error == "ImageError":
                raise ImageError(str(answer["message"]), code=str(answer["code"]), retryable=bool(answer["retryable"]))
            if error is not None:
                raise ImageError(f"{name}: cannot decode image: {error}: {answer.get('message')}", code="image_corrupt")
            size = (int(answer["width"]), int(answer["height"]))
            with worker.pixels.view(size[0] * size[1] * 3) as view:
                image = Image.frombytes("RGB", size, view)
            worker.pixels.trim()
            return answer, image
