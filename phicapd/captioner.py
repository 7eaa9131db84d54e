"""The seam between the pipeline and a captioning backend.

The scheduler hands a ``Captioner`` batches of decoded images; the native Phi-3.5-vision model
(``phicapd.model``) implements it, a fleet of OpenAI-compatible servers such as vLLM does too
(``phicapd.remote``), and tests use a deterministic fake. Everything here is plain data: no torch import.

A backend that batches continuously also offers ``stream(take, deliver)``: it asks ``take`` for
more work before every step and hands each caption to ``deliver`` the moment it is done, so a
request that arrives mid-batch joins it instead of waiting for it. ``streamer`` gives every
backend that shape, running a batch-only one batch by batch.
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

    ``prepared`` holds what the backend's optional ``prepare(image)`` returned, computed in the
    scheduler's CPU pool ahead of the GPU; a backend without ``prepare`` ignores it.
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


@runtime_checkable
class Captioner(Protocol):
    """A backend that turns batches of images into captions.

    ``caption`` returns one ``Caption`` per request, in order. It raises (a ``PhicapError``
    where it can say why) when the whole batch failed; the scheduler then retries the images
    one at a time so that one bad image cannot fail its neighbours.
    """

    @property
    def identity(self) -> str:
        """Model and revision recorded with every caption, e.g. ``microsoft/Phi-3.5-vision-instruct@main``."""
        ...

    @property
    def max_batch(self) -> int:
        """The largest batch this backend wants at once."""
        ...

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]: ...

    def close(self) -> None: ...


Take = Callable[[int, bool], list[CaptionRequest]]
"""``take(room, idle)``: at most ``room`` requests to start now (``idle``: nothing is running, so
a short wait to fill a batch costs nothing; an empty answer while idle ends the stream)."""

Deliver = Callable[[CaptionRequest, "Caption | PhicapError"], None]
"""``deliver(request, outcome)``: one request's caption, or the error that failed only it."""

Stream = Callable[[Take, Deliver], None]


def streamer(captioner: Captioner) -> Stream:
    """The backend's own ``stream`` if it has one, else its ``caption`` batch after batch.

    Either way a stream raises when everything in flight failed at once; the caller then
    decides what to do with the requests it took and never got back.
    """
    stream = getattr(captioner, "stream", None)
    if callable(stream):
        return stream

    def batches(take: Take, deliver: Deliver) -> None:
        while batch := take(captioner.max_batch, True):
            for request, caption in zip(batch, captioner.caption(batch), strict=True):
                deliver(request, caption)

    return batches


# A backend with ``prepare`` may set ``kept_image_side``: the longest side of the image the scheduler
# keeps beside the prepared form (default 2048, for the native model's retry with fewer crops).
# A backend may also offer ``stopping()``: the scheduler calls it when the daemon stops, so that a
# stream holding requests it cannot run now (every remote endpoint down) returns them undelivered
# at once instead of after the drain grace; the scheduler hands their jobs back to the journal.


def preparer(captioner: Captioner) -> Callable[[Image.Image], Any] | None:
    """The backend's CPU-side ``prepare(image)`` step (e.g. HD crops), if it has one."""
    prepare = getattr(captioner, "prepare", None)
    return prepare if callable(prepare) else None


def decorate(text: str, prefix: str = "", suffix: str = "") -> str:
    """Apply a watch root's prefix and suffix to a caption."""
    return f"{prefix}{text}{suffix}"
