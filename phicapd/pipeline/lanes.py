"""The scheduler's lanes and the rule that fills the model's free rows from them.

Three lanes wait for the model: interactive requests (socket), background jobs (journal), and
suspects, background jobs that were on the model when the daemon died (``interrupted``). What
``Lanes.pick`` hands the model for its free rows, in this order of precedence:

* interactive requests first, always;
* ``reserve`` rows (``interactive_slots``) stay free of background work, and while a socket
  request fits the reserved rows no background prefill starts beside it (it would stall the
  request's decode steps); more socket requests than that is bulk work, and the background
  fills in beside it;
* background rows only within the writer's back-pressure (``writer_room``), none while an image
  is decoded alone (``DecodeGate``) and none while paused;
* a suspect runs alone: no new background rows while one waits or runs, and it starts only on
  an empty model.

Everything here is state under one condition variable, ``cond``, which the scheduler, its
feeder and the decode gate share: callers hold it around every method but ``pick``'s inputs.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phicapd.captioner import Caption, CaptionRequest
from phicapd.errors import PhicapError
from phicapd.pipeline.writer import Finished

if TYPE_CHECKING:
    from phicapd.config import WatchRoot
    from phicapd.pipeline.decode import Decoded
    from phicapd.pipeline.journal import Job


@dataclass(slots=True)
class Item:
    """One image on its way through the worker: a background job or an interactive request."""

    request: CaptionRequest
    job: Job | None = None
    root: WatchRoot | None = None
    decoded: Decoded | None = None
    future: Future[Caption] | None = None
    accepted: float = field(default_factory=time.monotonic)
    batch_size: int = 0


@dataclass(slots=True)
class Outcome:
    """What the model made of one item."""

    item: Item
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


def is_suspect(job: Job | None) -> bool:
    """Interrupted on the model last time: it may be what brings the process down."""
    return job is not None and job.error_code == "interrupted"


class Lanes:
    """The images waiting for the model, those on it, and the journal jobs claimed for them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.interactive: collections.deque[Item] = collections.deque()
        self.background: collections.deque[Item] = collections.deque()
        self.suspects: collections.deque[Item] = collections.deque()  # interrupted: run alone
        self.decoding = 0  # background images claimed and not yet in a lane
        self.on_model: set[int] = set()  # background jobs marked running and not yet recorded
        # Jobs claimed from the journal and not yet recorded as finished. They stay "pending" on
        # disk until their batch starts, so a crash only counts an attempt against the images
        # that were actually on the model.
        self.claimed: set[int] = set()
        self.waiting: set[Future[Caption]] = set()  # interactive requests not answered yet
        self.in_flight: dict[int, Item] = {}  # taken by the model, not delivered; by id(request)

    def notify(self) -> None:
        """Wake whoever waits on the lanes (takes the lock itself): the writer took its queue up,
        the scheduler stops, the model broke."""
        with self.cond:
            self.cond.notify_all()

    def held(self) -> int:
        """Background images claimed and not on the model yet: what the prefetch bounds."""
        return self.decoding + len(self.background) + len(self.suspects)

    def ready(self, paused: bool) -> int:
        """Images that could go on the model now."""
        return len(self.interactive) + (0 if paused else len(self.background))

    def wait_to_fill(
        self, room: int, deadline: float, *, paused: bool, streams: bool, stopping: threading.Event
    ) -> None:
        """Wait (until ``deadline``) while images still being decoded could fill ``room`` rows;
        a batch-only model waits for more socket requests too (it cannot take them later)."""
        while (
            self.ready(paused) < room
            and (self.decoding > 0 or (self.interactive and not streams))
            and not stopping.is_set()
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)

    def decoded(self, item: Item | None) -> None:
        """A claimed job's decode ended: its item joins its lane (none: it went elsewhere)."""
        self.decoding -= 1
        if item is not None:
            (self.suspects if is_suspect(item.job) else self.background).append(item)
            self.cond.notify_all()

    def background_on_model(self) -> int:
        return sum(1 for i in self.in_flight.values() if i.job is not None)

    def has_work(self, *, paused: bool, alone: bool, writer_room: int) -> bool:
        """Something the worker could take: a request, or background work it may start."""
        if self.interactive:
            return True
        return not (paused or alone or writer_room <= 0) and bool(self.background or self.suspects)

    def pick(self, room: int, idle: bool, *, reserve: int, writer_room: int, paused: bool, alone: bool) -> list[Item]:
        """Up to ``room`` items for the model's free rows (see the module docstring); they are
        in flight from now on."""
        items: list[Item] = []
        while self.interactive and len(items) < room:
            item = self.interactive.popleft()
            if item.future is None or not item.future.cancelled():
                items.append(item)
        background_room = room - len(items) - reserve
        if idle and not items:
            background_room = max(background_room, 1)  # a lone background image may use any row
        if 0 < self._interactive_rows(items) <= reserve:
            # Every background prefill would stall a socket request's decode steps: none start
            # until it is answered (the rows already running carry on). More socket requests
            # than reserved rows is bulk work (caption-dir): the background fills in beside it.
            background_room = 0
        background_room = min(background_room, writer_room)
        if alone:
            # An image is decoded alone: no background job goes on the model meanwhile.
            background_room = 0
        elif background_room <= 0:
            pass  # the writer is a batch behind: not even an interrupted image goes on now
        elif not paused and (self.suspects or any(is_suspect(i.job) for i in self.in_flight.values())):
            # An interrupted image runs alone: no new background rows until the model is
            # empty, then it, then nothing beside it until it is done.
            background_room = 0
            if self.suspects and not self.in_flight and not items:
                items.append(self.suspects.popleft())
        while not paused and self.background and background_room > 0:
            items.append(self.background.popleft())
            background_room -= 1
        rows = len(self.in_flight) + len(items)
        for item in items:
            item.batch_size = rows
            self.in_flight[id(item.request)] = item
            if item.job is not None:
                self.on_model.add(item.job.id)
        return items

    def _interactive_rows(self, taking: list[Item]) -> int:
        return sum(1 for i in (*self.in_flight.values(), *taking) if i.future is not None)

    def settled(self, job_ids: list[int]) -> None:
        """The writer recorded these jobs in the journal: no longer claimed nor on the model."""
        self.claimed.difference_update(job_ids)
        self.on_model.difference_update(job_ids)
        self.cond.notify_all()  # an image waiting to be decoded alone may go now

    def requests_in_flight(self) -> list[Item]:
        """Take the socket requests off the model (it broke): their clients get an answer."""
        requests = [i for i in self.in_flight.values() if i.future is not None]
        for item in requests:
            del self.in_flight[id(item.request)]
        return requests

    def drain(self, *, broken: bool) -> tuple[list[Future[Caption]], set[int]]:
        """Empty every lane at stop: the requests still unanswered and the jobs to hand back to
        the journal (not those on a broken model: left "running", the restart counts an attempt)."""
        waiting = list(self.waiting)
        self.interactive.clear()
        self.background.clear()
        self.suspects.clear()
        self.on_model.clear()
        unfinished = set(self.claimed)
        self.claimed.clear()
        if broken:
            unfinished -= {i.job.id for i in self.in_flight.values() if i.job is not None}
        return waiting, unfinished

    def counts(self) -> dict[str, int]:
        return {
            "interactive": len(self.interactive),
            "background_ready": len(self.background),
            "interrupted_ready": len(self.suspects),
            "decoding": self.decoding,
            "claimed": len(self.claimed),
        }
