"""The breaker: a broken model is not the images' fault.

When the model fails everything in flight at once, the scheduler retries those images one by
one (``Breaker.caption_one``), so one bad image cannot fail its neighbours. A broken model (a
CUDA fault, or ``BREAKER`` images in a row failing alone and then a plain gray probe image
failing too) trips the breaker: the worker stops, the images on the model stay "running" in the
journal (the restart counts the attempt, as after a crash, so an image that breaks the GPU is
parked in the end) and the daemon exits for systemd to restart it, instead of failing the backlog.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from phicapd.captioner import Caption, Captioner, CaptionRequest
from phicapd.errors import CaptionError, PhicapError
from phicapd.log import get_logger

log = get_logger(__name__)

#: Failures in a row, each of one image alone, after which a probe image asks whether the model
#: or the images are broken (a backlog's tail can be all bad images).
BREAKER = 4


def is_model_fault(e: BaseException) -> bool:
    """A fault of the model or device itself (a sticky CUDA error), not of the images on it."""
    return isinstance(e, PhicapError) and e.code == "model_broken"


def as_phicap_error(e: Exception, name: str = "request") -> PhicapError:
    """``e`` as the error that failed the image ``name``."""
    if isinstance(e, PhicapError):
        return e
    return CaptionError(f"{name}: captioning failed: {type(e).__name__}: {e}")


def probe_image() -> Image.Image:
    """A plain gray image any working model captions."""
    return Image.new("RGB", (64, 48), (127, 127, 127))


class Breaker:
    """Counts images failing alone; trips (``broken``) on a model fault or a failed probe."""

    def __init__(
        self,
        captioner: Captioner,
        probe: Callable[[], CaptionRequest],
        on_trip: Callable[[], None],
        threshold: int = BREAKER,
    ) -> None:
        """``probe``: the request for ``probe_image``; ``on_trip``: wakes whoever waits for work."""
        self.captioner = captioner
        self._probe_request = probe
        self._on_trip = on_trip
        self.threshold = threshold
        self.failures_in_a_row = 0
        self.broken: PhicapError | None = None  # set once the model is unusable; the daemon then exits

    def succeeded(self) -> None:
        """An image was captioned: the failures before it were the images'."""
        self.failures_in_a_row = 0

    def caption_one(self, request: CaptionRequest, name: str) -> Caption | PhicapError:
        """One image alone, after the batch it was in failed. Counts towards the breaker."""
        try:
            captions = self.captioner.caption([request])
            if len(captions) != 1:
                raise CaptionError(f"captioner returned {len(captions)} captions for 1 image")
            return captions[0]
        except Exception as e:
            error = as_phicap_error(e, name)
            if is_model_fault(e):
                self.trip(error)
            elif error.retryable:  # a non-retryable error is the request's own (a bad prompt)
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= self.threshold:
                    self._probe(error)
            return error

    def _probe(self, last: PhicapError) -> None:
        """Caption a plain gray image: if even that fails, the model is broken, not the images."""
        try:
            self.captioner.caption([self._probe_request()])
        except Exception as e:
            self.trip(CaptionError(f"{self.threshold} images in a row and a probe image failed: {e}; before: {last}"))
        else:
            log.info("the model captions a probe image: the failing images are at fault", failures=self.threshold)
            self.failures_in_a_row = 0

    def trip(self, error: PhicapError) -> None:
        """The model is unusable: take nothing more; the daemon sees ``broken`` and exits."""
        if self.broken is None:
            log.error("the model is broken; stopping for a restart", code=error.code, error=str(error))
            self.broken = PhicapError(f"the model is broken: {error}", code="model_broken", retryable=True)
            self._on_trip()
