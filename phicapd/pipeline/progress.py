"""How much is left and when it will be done: ``progress`` in ``/v1/status``.

The estimate is taken over the images that can run now, not those sitting out a retry back-off
(they would make a minute-long wait read as "done in 2 s"), at the rate the model kept while it
was busy, so idle minutes between bursts do not dilute it (54 images done in 15 s are not
"17 min at 0.053 images/s"). While the daemon is paused, or waits for a remote endpoint, or
only back-offs are left, there is no estimate and ``no_eta`` says why.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ``no_eta`` values: why there is no estimate. Public API (JSON), like the error codes.
NO_ETA_PAUSED = "paused"
NO_ETA_WAITING = "waiting"  # every remote endpoint is down
NO_ETA_RETRYING = "retrying"  # only images waiting out a retry back-off are left
NO_ETA_NO_RATE = "no_rate"  # nothing captioned while busy within the window yet


class BusyRate:
    """Captions per second of busy time over a sliding window.

    ``busy``/``idle`` mark when the model has work (the scheduler's worker loop); ``add`` counts
    captions. Only the part of each busy span inside the window counts."""

    def __init__(self, window: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._events: collections.deque[float] = collections.deque()
        self._spans: collections.deque[tuple[float, float]] = collections.deque()  # closed (start, end)
        self._open: float | None = None
        self._lock = threading.Lock()

    def busy(self) -> None:
        with self._lock:
            if self._open is None:
                self._open = self._clock()

    def idle(self) -> None:
        with self._lock:
            if self._open is not None:
                self._spans.append((self._open, self._clock()))
                self._open = None

    def add(self, n: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._events.extend([now] * n)
            self._trim(now)

    def _trim(self, now: float) -> None:
        start = now - self.window
        while self._events and self._events[0] < start:
            self._events.popleft()
        while self._spans and self._spans[0][1] < start:
            self._spans.popleft()

    def recent(self) -> tuple[float, float]:
        """(captions per busy second, busy seconds in the window); (0, 0) before any busy time."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            start = now - self.window
            spans = [*self._spans, *([(self._open, now)] if self._open is not None else [])]
            busy = sum(max(0.0, end - max(begin, start)) for begin, end in spans)
            if busy <= 0:
                return 0.0, 0.0
            return len(self._events) / busy, busy


@dataclass(frozen=True)
class Backlog:
    runnable: int  # pending and due, or running
    retrying: int  # pending, waiting out a retry back-off
    next_retry_in: float | None  # seconds until the first of those is due


def progress_report(backlog: Backlog, rate: float, busy_seconds: float, state: str) -> dict[str, Any]:
    """The ``progress`` keys about the backlog (``failures_by_code`` is added by the caller)."""
    total = backlog.runnable + backlog.retrying
    eta: float | None
    no_eta: str | None = None
    if total == 0:
        eta = 0.0
    elif state == "paused":
        eta, no_eta = None, NO_ETA_PAUSED
    elif state == "waiting":
        eta, no_eta = None, NO_ETA_WAITING
    elif backlog.runnable == 0:
        eta, no_eta = None, NO_ETA_RETRYING
    elif rate > 0:
        eta = round(backlog.runnable / rate, 1)
    else:
        eta, no_eta = None, NO_ETA_NO_RATE
    return {
        "backlog": total,
        "runnable": backlog.runnable,
        "retrying": backlog.retrying,
        "next_retry_in_seconds": None if backlog.next_retry_in is None else round(backlog.next_retry_in, 1),
        "images_per_second": round(rate, 3),  # while busy
        "rate_window_seconds": round(busy_seconds, 1),  # the busy seconds the rate is taken over
        # Over ``runnable`` only; None with ``no_eta`` saying why.
        "eta_seconds": eta,
        "no_eta": no_eta,
    }
