"""Captions per second over a sliding window, for status and the watchdog's STATUS= line."""

from __future__ import annotations

import collections
import threading
import time


class Throughput:
    """Captions counted as they finish; ``rate`` is those of the last ``window`` seconds."""

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
