"""The seam between the pipeline and a captioning backend.

The scheduler hands a ``Captioner`` decoded images; the native Phi-3.5-vision model
(``phicapd.model``) implements it, a fleet of OpenAI-compatible servers such as vLLM does too
(``phicapd.remote``), and tests use deterministic fakes. Everything here is plain data: no torch import.

``Captioner`` declares every member the daemon uses; each backend implements all of them (a
member a backend has nothing to do for is a trivial one, saying so), so no caller probes for one.
The daemon's captions go through ``stream(take, deliver)``: the backend asks ``take`` for more
work whenever it has room and hands each caption to ``deliver`` the moment it is done, so a
request that arrives mid-batch joins it instead of waiting for it. ``caption(batch)`` is the
fixed batch the scheduler falls back on to retry images one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from phicapd.errors import PhicapError


@dataclass(frozen=True, slots=True)
class CaptionRequest:
    """One image to caption. ``image`` is an 8-bit RGB image from ``phicapd.imaging``.

    ``prepared`` holds what the backend's ``prepare(image)`` returned, computed in the
    scheduler's CPU pool ahead of the GPU (None: it had nothing to prepare).
    """

    image: Image.Image
    prompt: str
    max_new_tokens: int
    prepared: Any = None


@dataclass(frozen=True, slots=True)
class Caption:
    """A finished caption: the model's text and how many tokens it generated for it.

    A backend returns the text as the model (or server) gave it; the scheduler cleans and
    checks it once (``phicapd.caption_text.checked_caption``) before anything stores it.

    A backend that is more than one model (a fleet of servers) says which made this caption:
    ``backend`` ("native", "openai"), the ``endpoint`` it came from and the ``model`` the server
    reported. Unset, the journal records the backend's ``identity``.
    """

    text: str
    new_tokens: int
    backend: str | None = None
    endpoint: str | None = None
    model: str | None = None


Take = Callable[[int, bool], list[CaptionRequest]]
"""``take(room, idle)``: at most ``room`` requests to start now (``idle``: nothing is running, so
a short wait to fill a batch costs nothing; an empty answer while idle ends the stream)."""

Deliver = Callable[[CaptionRequest, "Caption | PhicapError"], None]
"""``deliver(request, outcome)``: one request's caption, or the error that failed only it."""


@runtime_checkable
class Captioner(Protocol):
    """A backend that turns images into captions. The scheduler's GPU worker is the only thread
    that calls ``stream`` and ``caption``; ``prepare`` runs in its decode pool meanwhile."""

    @property
    def identity(self) -> str:
        """Model and revision recorded with every caption, e.g. ``microsoft/Phi-3.5-vision-instruct@main``."""
        ...

    @property
    def max_batch(self) -> int:
        """The most requests this backend runs at once (rows on the GPU, requests on the wire)."""
        ...

    @property
    def continuous_batching(self) -> bool:
        """True when ``stream`` takes new requests while others run (between decode steps, or as
        an endpoint frees a slot): the scheduler then keeps ``interactive_slots`` rows free for
        socket requests. False: ``stream`` runs batch after batch, and a socket request waits
        for at most the batch on the model."""
        ...

    @property
    def kept_image_side(self) -> int:
        """The longest side of the image a request keeps beside what ``prepare`` made: a larger
        one is cut down to it before it waits for the model (the native model needs it again
        for a retry with fewer crops; the remote one's data URL is all it sends)."""
        ...

    def prepare(self, image: Image.Image) -> Any:
        """CPU-side work on one image ahead of the model (HD crops, a data URL), run in the
        scheduler's decode pool; the result travels as ``CaptionRequest.prepared``. None: nothing
        to prepare, and the request keeps the whole image."""
        ...

    def stream(self, take: Take, deliver: Deliver) -> None:
        """Caption what ``take`` hands over, delivering each outcome as it is done, until ``take``
        answers nothing while idle. It raises when everything in flight failed at once; the
        caller decides what to do with the requests it took and never got back."""
        ...

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        """One ``Caption`` per request, in order. Raises (a ``PhicapError`` where it can say why)
        when the batch failed; the scheduler retries images one at a time through it, so that
        one bad image cannot fail its neighbours."""
        ...

    def warm_up(self) -> None:
        """Before the daemon says READY: whatever makes the first caption as fast as the rest
        (the native model sizes its KV cache and captures its decode graphs)."""
        ...

    def describe(self) -> dict[str, Any]:
        """For ``phicapctl status`` and ``/metrics``: JSON-able facts about the backend (device,
        engine, endpoints); a "gpu" key, if any, is shown apart as ``status``'s ``gpu``."""
        ...

    @property
    def waiting(self) -> str | None:
        """Why no caption can be made now (every remote endpoint is down), or None. The daemon
        then says "waiting" and answers socket requests at once instead of after their timeout."""
        ...

    def stopping(self) -> None:
        """The daemon stops (called before the drain): a stream holding requests it cannot run
        now returns them undelivered at once rather than after the drain grace; the scheduler
        hands their jobs back to the journal."""
        ...

    def close(self) -> None:
        """Free what the backend holds (GPU memory, threads, connections); nothing is called after."""
        ...


def decorate(text: str, prefix: str = "", suffix: str = "") -> str:
    """Apply a watch root's prefix and suffix to a caption."""
    return f"{prefix}{text}{suffix}"
