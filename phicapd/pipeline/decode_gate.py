"""The crash-isolation gate in front of the decode pool.

Each background image is marked in the journal while it is decoded and prepared for the backend
(``Journal.mark_decoding``), so an image that crashes the daemon's own process there (the
backend's preprocessing is C code over its pixels too) is blamed at the next start
(``interrupted_decoding``). Such an image is decoded alone: no other decode runs, and no
background job is on the model or waiting for its journal record (``Lanes.pick`` starts none
while ``alone``), so a second crash blames only it, and it is parked after ``max_attempts``
without being decoded again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from phicapd.errors import INTERRUPTED_DECODING
from phicapd.pipeline.journal import Job
from phicapd.pipeline.lanes import Lanes

#: How often a decode waiting at the gate looks at ``stopping`` (it is woken on every change too).
POLL_SECONDS = 0.5


class GateClosed(Exception):
    """The scheduler stops while a decode waits at the gate."""


def decode_suspect(job: Job) -> bool:
    """Interrupted while it was being decoded last time: it may crash the decoder."""
    return job.error_code == INTERRUPTED_DECODING


class DecodeGate:
    """Decode slots under the lanes' condition: any number side by side, or one image alone."""

    def __init__(self, lanes: Lanes, stopping: threading.Event) -> None:
        self._lanes = lanes
        self._stopping = stopping
        self.active = 0  # images being decoded now
        # Images interrupted while decoding last time that wait to be (or are being) decoded alone.
        self.waiting_alone = 0

    @property
    def alone(self) -> bool:
        """An image is (or waits to be) decoded alone: nothing else is decoded nor goes on the model."""
        return self.waiting_alone > 0

    def may_enter(self, *, alone: bool) -> bool:
        """Whether a decode may start now (under the lanes' condition)."""
        if alone:
            return self.active == 0 and not self._lanes.on_model
        return self.waiting_alone == 0

    @contextlib.contextmanager
    def slot(self, *, alone: bool) -> Iterator[None]:
        """Decode one image, or with ``alone`` one that was being decoded when the daemon died:
        that waits until no other decode runs and no background job is on the model or waiting
        for its journal record (other decodes wait behind it meanwhile), so if it crashes the
        process again, the next start blames it and nothing else. Raises ``GateClosed`` when
        the scheduler stops while it waits."""
        cond = self._lanes.cond
        with cond:
            if alone:
                self.waiting_alone += 1
            try:
                while not self.may_enter(alone=alone):
                    if self._stopping.is_set():
                        raise GateClosed
                    cond.wait(POLL_SECONDS)
            except BaseException:
                if alone:
                    self.waiting_alone -= 1
                    cond.notify_all()
                raise
            self.active += 1
        try:
            yield
        finally:
            with cond:
                self.active -= 1
                if alone:
                    self.waiting_alone -= 1
                cond.notify_all()
