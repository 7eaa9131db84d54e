"""``RemoteCaptioner``: the ``Captioner`` seam over a pool of OpenAI-compatible endpoints.

``stream`` keeps as many requests in flight as the endpoints' limits allow, each on a thread of
its own, and delivers every caption the moment its reply lands, so a slow request never holds
up the others and a socket request (taken first by the scheduler) starts at the next free slot.

What happens to a request that fails depends on whose fault it was (``chat_api.Kind``):

* the endpoint's (refused, 429/503, a refused key): sent again, to another endpoint or to this
  one once it is back; never counted against the image. With every endpoint down the requests
  wait here and the scheduler's backlog waits in the journal, still pending, until the prober
  lets an endpoint back in.
* the request's (a 5xx, a malformed reply): sent again up to ``TRIES_PER_IMAGE`` times, then
  delivered as a retryable ``remote_failed``, which the journal retries later.
* the image's (a 400 naming it): delivered at once as ``image_rejected``, not retried.
* the endpoint's configuration (a 400 refusing a request parameter, or saying the server was
  not started to allow it: vLLM refuses ``mm_processor_kwargs`` unless started with
  ``--trust-request-mm-kwargs``): never the image's. A parameter phicapd can do without is left
  out of that endpoint's requests from then on, said once in the log and in status (``omits``),
  and the request is sent again; any other refusal takes the endpoint out (``pool``).
* a dropped connection or a timeout (``timeout_seconds``, connect to last byte): the first one
  may be anyone's (a server restart drops everything in flight), so the request is sent again,
  uncounted; it counts against the endpoint only if the endpoint answered no other image while
  it was on the wire. If it happens again to the same image and the endpoint answered other
  images since (or, with none to go by, answers a probe image now), it is the image's: delivered
  as a retryable ``remote_dropped``, which the journal counts against ``max_attempts`` (with its
  backoff, so a slow or poisonous image never holds slots ahead of retries that are due) and
  parks after the last; the endpoint stays up. If the endpoint fails the probe image too, it is
  the endpoint's: taken out, and the request waits, uncounted.
* a reply larger than ``max_tokens`` can make (``chat_api.reply_cap``): refused unread, as a
  retryable ``caption_too_long``; the endpoint answered, so it stays up.

Captions are returned as the server wrote them; the scheduler cleans and checks every caption,
from any backend, once (``phicapd.caption_text``).
"""

from __future__ import annotations

import collections
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd.captioner import Caption, CaptionRequest, Deliver, Take
from phicapd.config import ModelSettings, RemoteSettings, Settings
from phicapd.errors import CAPTION_TOO_LONG, CaptionError, ConfigError, ImageError, ModelUnavailable, PhicapError
from phicapd.log import get_logger
from phicapd.remote.chat_api import (
    Completion,
    Http,
    Kind,
    RemoteFailure,
    chat_body,
    classify,
    parse_completion,
    reply_cap,
)
from phicapd.remote.encode import data_url
from phicapd.remote.pool import Endpoint, Pool

log = get_logger(__name__)

BACKEND = "openai"
#: Server-side failures (5xx, timeouts, malformed replies) one image may meet before it is
#: delivered as a retryable failure; failures of a whole endpoint do not count.
TRIES_PER_IMAGE = 3
#: How often the stream asks the scheduler for new work while requests are in flight: the
#: longest a socket request waits for a free slot to be noticed.
POLL_SECONDS = 0.05
#: With every endpoint down and nothing in flight, the stream hands control back this often, so
#: the scheduler can stop and its watchdog sees it alive.
IDLE_WAIT_SECONDS = 0.5

IMAGE_REJECTED = "image_rejected"
REMOTE_FAILED = "remote_failed"
REMOTE_REJECTED = "remote_rejected"
#: The connection was dropped, or no complete reply came within ``timeout_seconds``, twice for
#: this image while the endpoint answered others: the image's failure (retryable; parked after
#: ``max_attempts``).
REMOTE_DROPPED = "remote_dropped"
#: The image a probe asks for when there is nothing else to tell whether an endpoint still
#: answers images: plain gray, one token.
PROBE_SIZE = (64, 48)


@dataclass(slots=True)
class _Pending:
    request: CaptionRequest
    failures: int = 0  # server errors (5xx, malformed)
    dropped_at: float | None = None  # monotonic: its last drop or timeout (one that may recur)


@dataclass(slots=True)
class _Done:
    pending: _Pending
    endpoint: Endpoint
    outcome: Completion | RemoteFailure
    image_fault: bool = False  # a drop or timeout that is the image's: delivered as ``remote_dropped``


class RemoteCaptioner:
    def __init__(self, remote: RemoteSettings, model: ModelSettings, pool: Pool) -> None:
        self.remote = remote
        self.model_settings = model
        self.pool = pool
        self._identity = f"{BACKEND}:{remote.model}"
        slots = len(pool.endpoints) * remote.max_in_flight
        self._max_batch = max(1, min(512, slots))
        self._threads = ThreadPoolExecutor(self._max_batch, thread_name_prefix="phicapd-remote")
        self._done: collections.deque[_Done] = collections.deque()
        self._closed = False
        self._stopping = False

    #: Once ``prepare`` made the data URL, the scheduler need keep only a thumbnail of the image:
    #: with a fleet, hundreds of images are held at once (``max_batch`` is every endpoint's slots).
    kept_image_side = 64
    #: A request is sent as soon as an endpoint has a free slot, whatever else is on the wire.
    continuous_batching = True

    # -- the Captioner seam --------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def prepare(self, image: Image.Image) -> str:
        """In the scheduler's decode pool: the data URL the request will carry."""
        r = self.remote
        crops = self.model_settings.num_crops
        return data_url(image, fmt=r.image_format, quality=r.jpeg_quality, max_pixels=r.max_pixels, num_crops=crops)

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        """The batch through ``stream``; raises the first image's error if any image failed."""
        todo = list(batch)
        results: dict[int, Caption | PhicapError] = {}

        def take(room: int, idle: bool) -> list[CaptionRequest]:
            out, todo[:] = todo[:room], todo[room:]
            return out

        def deliver(request: CaptionRequest, outcome: Caption | PhicapError) -> None:
            results[id(request)] = outcome

        while len(results) < len(batch):
            if self._closed or self._stopping:
                raise PhicapError("the daemon is shutting down", code="shutting_down", retryable=True)
            self.stream(take, deliver)
        outcomes = [results[id(r)] for r in batch]
        for outcome in outcomes:
            if isinstance(outcome, PhicapError):
                raise outcome
        return [o for o in outcomes if isinstance(o, Caption)]

    def stream(self, take: Take, deliver: Deliver) -> None:
        waiting: collections.deque[_Pending] = collections.deque()  # need an endpoint
        in_flight = 0
        while not self._closed:
            with self.pool.cond:
                done = list(self._done)
                self._done.clear()
            for d in done:
                in_flight -= 1
                outcome = self._settle(d)
                if outcome is None:
                    waiting.appendleft(d.pending)  # before new work: it has waited longest
                else:
                    deliver(d.pending.request, outcome)
            while waiting and not self._stopping and (endpoint := self.pool.acquire()) is not None:
                self._threads.submit(self._send, waiting.popleft(), endpoint)
                in_flight += 1
            room = self.pool.free()
            idle = in_flight == 0 and not waiting
            if idle and room == 0:
                # Every endpoint is down or paused: wait for one, then give control back.
                self._wait(IDLE_WAIT_SECONDS)
                if self.pool.free() == 0:
                    return
                continue
            if self._stopping and in_flight == 0:
                return  # the daemon stops and nothing is on the wire: what waits goes back to the journal
            new = take(room, idle) if room > 0 else take(0, False)  # room 0: the scheduler's heartbeat
            if idle and not new:
                return
            for request in new:
                endpoint = self.pool.acquire()
                if endpoint is None:
                    waiting.append(_Pending(request))
                else:
                    self._threads.submit(self._send, _Pending(request), endpoint)
                    in_flight += 1
            if not new:
                self._wait(POLL_SECONDS)

    def _wait(self, seconds: float) -> None:
        with self.pool.cond:
            if not self._done and not self._closed:
                self.pool.cond.wait(seconds)

    def _send(self, pending: _Pending, endpoint: Endpoint) -> None:
        """On a request thread: one request to one endpoint; the outcome goes to the stream."""
        started = time.monotonic()
        outcome: Completion | RemoteFailure
        image_fault = False
        try:
            outcome = self._post(pending.request, endpoint)
        except RemoteFailure as e:
            outcome = e
        except Exception as e:  # a bug must not lose the request: it is the server's fault to the image
            log.exception("remote request crashed", endpoint=endpoint.url)
            outcome = RemoteFailure(Kind.SERVER, f"{type(e).__name__}: {e}")
        if isinstance(outcome, RemoteFailure):
            if outcome.kind in (Kind.DROPPED, Kind.TIMEOUT) and not self._closed:
                image_fault = self._dropped(pending, endpoint, outcome, started)
            else:
                self.pool.failed(endpoint, outcome)
        else:
            self.pool.succeeded(endpoint, time.monotonic() - started, outcome.model)
        with self.pool.cond:
            self._done.append(_Done(pending, endpoint, outcome, image_fault))
            self.pool.cond.notify_all()

    def _dropped(self, pending: _Pending, endpoint: Endpoint, failure: RemoteFailure, started: float) -> bool:
        """Whose a drop or timeout is (see the module's docstring); True: the image's. Counts it
        against the endpoint, or takes the endpoint out, when it is the endpoint's."""
        again = pending.dropped_at is not None
        since = pending.dropped_at if pending.dropped_at is not None else started
        answers = self.pool.answered_since(endpoint, since)  # other images, meanwhile
        pending.dropped_at = time.monotonic()
        if not again:
            self.pool.failed(endpoint, failure, endpoint_fault=not answers)
            return False
        if not answers:
            answers = self._answers_probe(endpoint)
        if answers:
            self.pool.failed(endpoint, failure, endpoint_fault=False)
            return True
        self.pool.failed(endpoint, failure)
        self.pool.mark_down(endpoint, f"a probe image failed too, after: {failure}")
        pending.dropped_at = None  # the endpoint's: counted afresh wherever it goes next
        return False

    def _answers_probe(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` captions a plain gray image now (one token, within ``timeout``)."""
        request = CaptionRequest(Image.new("RGB", PROBE_SIZE, (127, 127, 127)), self.model_settings.prompt, 1)
        try:
            parse_completion(self._exchange(request, endpoint))
        except RemoteFailure as e:
            log.warning("endpoint fails a probe image", endpoint=endpoint.url, error=str(e))
            return False
        self.pool.answered(endpoint)
        return True

    def _post(self, request: CaptionRequest, endpoint: Endpoint) -> Completion:
        return parse_completion(self._exchange(request, endpoint))

    def _exchange(self, request: CaptionRequest, endpoint: Endpoint) -> bytes:
        """The body of a 200 reply to ``request``; ``RemoteFailure`` for anything else."""
        m = self.model_settings
        url = request.prepared if isinstance(request.prepared, str) else self.prepare(request.image)
        body = chat_body(
            model=self.remote.model,
            prompt=request.prompt,
            image_url=url,
            max_tokens=request.max_new_tokens,
            temperature=m.temperature if m.do_sample else 0.0,
            top_p=m.top_p if m.do_sample else 1.0,
            # Left out where the endpoint refused it (``pool.OPTIONAL_PARAMETERS``).
            num_crops=m.num_crops
            if self.remote.send_num_crops and "mm_processor_kwargs" not in endpoint.omits
            else None,
        )
        cap = reply_cap(request.max_new_tokens)
        status, headers, data = self.pool.http.request(endpoint.target, "POST", "/chat/completions", body, max_body=cap)
        if status != 200:
            raise classify(status, data, headers)
        return data

    def _sends_num_crops(self, endpoint: Endpoint) -> bool:
        """Unless told not to, or the endpoint refused them (``pool.OPTIONAL_PARAMETERS``)."""
        return self.remote.send_num_crops and "mm_processor_kwargs" not in endpoint.omits

    def _settle(self, done: _Done) -> Caption | PhicapError | None:
        """What a finished request delivers; None: send it again."""
        outcome = done.outcome
        url = done.endpoint.url
        if isinstance(outcome, Completion):
            model = outcome.model or self.remote.model
            return Caption(outcome.text, outcome.completion_tokens, backend=BACKEND, endpoint=url, model=model)
        if done.image_fault:
            return CaptionError(
                f"{url} failed this image again while it answered others: {outcome}", code=REMOTE_DROPPED
            )
        if outcome.kind is Kind.TOO_LONG:
            return CaptionError(f"{url} sent more than the tokens asked for: {outcome}", code=CAPTION_TOO_LONG)
        if outcome.kind is Kind.IMAGE:
            return ImageError(f"{done.endpoint.url} refused the image: {outcome}", code=IMAGE_REJECTED)
        if outcome.kind is Kind.REJECTED:
            log.warning("the server refused the request", endpoint=done.endpoint.url, error=str(outcome))
            return CaptionError(f"{done.endpoint.url} refused the request: {outcome}", code=REMOTE_REJECTED)
        if outcome.kind is Kind.SERVER:
            done.pending.failures += 1
            if done.pending.failures >= TRIES_PER_IMAGE:
                return CaptionError(
                    f"{done.pending.failures} server errors for this image, "
                    f"the last from {done.endpoint.url}: {outcome}",
                    code=REMOTE_FAILED,
                )
        return None

    # -- status and lifecycle ------------------------------------------------------------------

    def warm_up(self) -> None:
        """Nothing to warm: every endpoint answered ``GET /v1/models`` when the backend was loaded."""

    def describe(self) -> dict[str, Any]:
        endpoints = self.pool.describe()
        info: dict[str, Any] = {
            "backend": BACKEND,
            "identity": self.identity,
            "served_model": self.remote.model,
            "endpoints_up": sum(1 for e in endpoints if e["up"]),
            "endpoints": endpoints,
        }
        if (reason := self.waiting) is not None:
            info["waiting"] = reason
        return info

    @property
    def waiting(self) -> str | None:
        """Why no request can be sent now (every endpoint down), or None."""
        return self.pool.waiting_reason()

    def stopping(self) -> None:
        """The daemon stops: requests in flight may finish, those waiting for an endpoint are let go."""
        self._stopping = True
        with self.pool.cond:
            self.pool.cond.notify_all()

    def close(self) -> None:
        self._closed = True
        self.pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)


# -- loading -----------------------------------------------------------------------------------


def read_api_key(path: Path | None) -> str | None:
    """The key in ``path`` (first line, trimmed). Errors name the file, never its content."""
    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"[remote] api_key_file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"[remote] api_key_file {path} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"[remote] api_key_file {path} cannot be read: {type(e).__name__}") from None
    if not key or not key[0].strip():
        raise ConfigError(f"[remote] api_key_file {path} is empty")
    return key[0].strip()


def ssl_context(remote: RemoteSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(remote.ca_file) if remote.ca_file else None)
    if not remote.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_remote(remote: RemoteSettings) -> tuple[ssl.SSLContext, str | None]:
    """What the start refuses before it asks an endpoint anything (``phicapd check-config`` runs
    it too): the CA bundle and the API key file. ``ConfigError`` names the key; the key is never
    shown."""
    try:
        context = ssl_context(remote)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[remote] ca_file {remote.ca_file}: {e}") from None
    return context, read_api_key(remote.api_key_file)


def load_remote_captioner(settings: Settings) -> RemoteCaptioner:
    """Check every endpoint once (``GET /v1/models``) and start the pool.

    A refused API key or an endpoint that serves another model is a ``ConfigError`` (exit 78:
    no restart fixes it); when no endpoint answers at all it is ``ModelUnavailable`` (the daemon
    tries again); endpoints that do not answer while others do start out down and are probed in.
    """
    remote = settings.remote
    context, api_key = check_remote(remote)
    http = Http(
        timeout=remote.timeout_seconds,
        connect_timeout=remote.connect_timeout_seconds,
        api_key=api_key,
        ssl_context=context,
    )
    pool = Pool(
        remote.endpoints,
        http,
        model=remote.model,
        initial=remote.initial_in_flight,
        maximum=remote.max_in_flight,
        probe_interval=remote.probe_interval_seconds,
        failures_to_trip=remote.failures_to_trip,
    )
    down: list[str] = []
    for endpoint in pool.endpoints:
        try:
            pool.check(endpoint)
        except RemoteFailure as e:
            if e.kind is Kind.AUTH:
                raise ConfigError(f"[remote] {endpoint.url}: {e}; check api_key_file") from None
            if e.kind is Kind.TLS:
                raise ConfigError(f"[remote] {endpoint.url}: {e}; set ca_file, or tls_verify = false") from None
            if e.kind is Kind.MODEL:
                raise ConfigError(f"[remote] {endpoint.url} {e}: set [remote] model to the served name") from None
            pool.mark_down(endpoint, str(e))
            down.append(f"{endpoint.url}: {e}")
    http.close()  # the checks' connections belong to this thread, which sends nothing later
    if len(down) == len(pool.endpoints):
        raise ModelUnavailable("no [remote] endpoint answers: " + "; ".join(down))
    pool.start()
    log.info(
        "remote backend ready",
        model=remote.model,
        endpoints=[e.url for e in pool.endpoints],
        down=len(down),
    )
    return RemoteCaptioner(remote, settings.model, pool)
