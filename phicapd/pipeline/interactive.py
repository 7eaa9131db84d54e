"""Socket requests: image bytes --> their own decode pool --> the interactive lane.

Requests are decoded in a small pool apart from the backlog's, so a caption asked for over the
socket never queues behind the backlog's decodes. Every request is answered through its future:
with its caption, with the ``PhicapError`` that failed it, or with a retryable ``shutting_down``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

from phicapd.captioner import Caption
from phicapd.config import ModelSettings
from phicapd.errors import PhicapError
from phicapd.log import get_logger
from phicapd.pipeline.decode import DecodeBytes
from phicapd.pipeline.feeder import MakeRequest
from phicapd.pipeline.lanes import Item, Lanes

log = get_logger(__name__)

#: Threads decoding socket requests, apart from the backlog's decode pool so they never queue behind it.
INTERACTIVE_DECODERS = 4


def answer(future: Future[Caption], outcome: Caption | PhicapError) -> bool:
    """Answer a request unless its client cancelled it or it was answered already (at stop);
    True when it got its caption."""
    try:
        if isinstance(outcome, PhicapError):
            future.set_exception(outcome)
            return False
        future.set_result(outcome)
        return True
    except InvalidStateError:
        return False


def shutting_down() -> PhicapError:
    return PhicapError("the daemon is shutting down", code="shutting_down", retryable=True)


class InteractiveIntake:
    """Decodes socket requests and queues them in the interactive lane."""

    def __init__(
        self,
        lanes: Lanes,
        *,
        workers: int,
        decode_bytes: DecodeBytes,
        make_request: MakeRequest,
        observe_failure: Callable[[str, PhicapError], None],
        stopping: threading.Event,
    ) -> None:
        self._lanes = lanes
        self.decode_bytes = decode_bytes
        self._make_request = make_request
        self._observe_failure = observe_failure
        self._stopping = stopping
        self._pool = ThreadPoolExecutor(min(INTERACTIVE_DECODERS, workers), thread_name_prefix="phicapd-decode-rq")

    def submit(
        self, model: ModelSettings, data: bytes, name: str, prompt: str | None, max_new_tokens: int | None
    ) -> Future[Caption]:
        """Caption image bytes; ``model`` gives the prompt and token limit a request leaves out."""
        future: Future[Caption] = Future()
        with self._lanes.cond:
            self._lanes.waiting.add(future)
        future.add_done_callback(self._forget)
        if self._stopping.is_set():
            future.set_exception(shutting_down())
            return future
        request_prompt = prompt or model.prompt
        tokens = max_new_tokens or model.max_new_tokens
        self._pool.submit(self._decode, future, data, name, request_prompt, tokens)
        return future

    def _decode(self, future: Future[Caption], data: bytes, name: str, prompt: str, tokens: int) -> None:
        if future.cancelled():
            return
        try:
            item = Item(self._make_request(self.decode_bytes(data, name), prompt, tokens), future=future)
        except PhicapError as e:
            self._observe_failure("interactive", e)
            future.set_exception(e)
            return
        except Exception as e:  # a decoder bug must not take the request down silently
            log.exception("decoder crashed", input=name)
            error = PhicapError(f"{name}: cannot decode image: {e}", code="image_corrupt")
            self._observe_failure("interactive", error)
            future.set_exception(error)
            return
        with self._lanes.cond:
            self._lanes.interactive.append(item)
            self._lanes.cond.notify_all()

    def _forget(self, future: Future[Caption]) -> None:
        with self._lanes.cond:
            self._lanes.waiting.discard(future)

    def stop(self) -> None:
        """After ``stopping`` is set: wait for the decodes running, drop those not started."""
        self._pool.shutdown(wait=True, cancel_futures=True)
