"""The endpoints: each one's adaptive in-flight limit, its circuit breaker and its counters.

* Limit: starts at ``initial_in_flight``; while the endpoint is kept busy and its latency holds
  (a running average within ``GROW_WHILE`` of the best seen lately) it grows by ``GROW_STEP`` per
  limit's worth of successes, up to ``max_in_flight``. A 429 or 503 halves it and pauses the endpoint
  for the ``Retry-After`` it gave.
* Breaker: a refused connection, an untrusted certificate, a refused API key or another served
  model, or ``failures_to_trip`` server errors, dropped connections or timeouts in a row, take
  the endpoint out ("down"). A drop or timeout that the captioner finds is one image's doing
  (the endpoint answers other images meanwhile: ``failed(..., endpoint_fault=False)``) does not
  count: the endpoint stays up. The prober asks ``GET /v1/models`` every
  ``probe_interval_seconds`` and lets it back in, with its limit starting over, once it answers
  and serves the configured model.
* Configuration: a server that refuses a request parameter (``Kind.UNSUPPORTED``) is not
  broken, it was started without allowing it. A parameter phicapd can do without
  (``OPTIONAL_PARAMETERS``) is left out of that endpoint's requests from then on (``omits``);
  any other refusal takes the endpoint out until phicapd restarts, since no probe can tell
  that its flags changed (``refused``).

All state is under one condition, which the captioner's stream waits on: a finished request or
an endpoint coming back wakes it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from phicapd.log import get_logger
from phicapd.remote.chat_api import Http, Kind, RemoteFailure, Target, classify, served_models

#: Request parameters an endpoint may refuse and phicapd then leaves out, with what that means.
OPTIONAL_PARAMETERS = {
    "mm_processor_kwargs": (
        "the server's own --mm-processor-kwargs set num_crops for every request; start vLLM with "
        "--trust-request-mm-kwargs to let phicapd send [model] num_crops, or set [remote] "
        "send_num_crops = false to stop asking"
    ),
}

log = get_logger(__name__)

#: Latency "holds" while the running average is within this factor of the best seen lately
#: (plus ``LATENCY_SLACK`` seconds, so that a few milliseconds of jitter on a fast reply do not count).
GROW_WHILE = 1.5
LATENCY_SLACK = 0.02
#: The limit grows by this much per limit's worth of successes at the limit (about two per round trip).
GROW_STEP = 2.0
#: Latency samples the "best seen lately" is taken over.
LATENCY_WINDOW = 64


@dataclass
class Endpoint:
    target: Target
    limit: float
    up: bool = True
    reason: str | None = None  # why it is down
    in_flight: int = 0
    paused_until: float = 0.0  # monotonic: Retry-After
    failures_in_a_row: int = 0
    last_success: float = -1.0  # monotonic: when it last answered an image with a caption
    next_probe: float = 0.0
    latency_avg: float | None = None
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    requests: int = 0
    successes: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    served_model: str | None = None
    omits: set[str] = field(default_factory=set)  # request parameters it refused (``OPTIONAL_PARAMETERS``)
    refused: str | None = None  # it refuses the request as phicapd builds it: out until a restart

    @property
    def url(self) -> str:
        return self.target.url

    def free(self, now: float) -> int:
        if not self.up or now < self.paused_until:
            return 0
        return max(0, int(self.limit) - self.in_flight)


class Pool:
    def __init__(
        self,
        urls: list[str],
        http: Http,
        *,
        model: str,
        initial: int,
        maximum: int,
        probe_interval: float,
        failures_to_trip: int,
    ) -> None:
        self.http = http
        self.model = model
        self.initial = initial
        self.maximum = maximum
        self.probe_interval = probe_interval
        self.failures_to_trip = failures_to_trip
        self.endpoints = [Endpoint(Target.parse(u), float(initial)) for u in urls]
        self.cond = threading.Condition()
        self._closed = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="phicapd-probe", daemon=True)

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        self._prober.start()

    def close(self) -> None:
        self._closed.set()
        self.http.abort()
        with self.cond:
            self.cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- capacity ------------------------------------------------------------------------------

    def free(self) -> int:
        """Requests that may start now, over all endpoints."""
        now = time.monotonic()
        with self.cond:
            return sum(e.free(now) for e in self.endpoints)

    def acquire(self) -> Endpoint | None:
        """The endpoint with the most room relative to its limit, its slot taken; None if none has room."""
        now = time.monotonic()
        with self.cond:
            open_ = [e for e in self.endpoints if e.free(now) > 0]
            if not open_:
                return None
            best = min(open_, key=lambda e: (e.in_flight + 1) / e.limit)
            best.in_flight += 1
            best.requests += 1
            return best

    def waiting_reason(self) -> str | None:
        """Why nothing can be sent, when no endpoint is up; None while one is."""
        with self.cond:
            if any(e.up for e in self.endpoints):
                return None
            return "all endpoints are down: " + "; ".join(f"{e.url}: {e.reason}" for e in self.endpoints)

    # -- outcomes ------------------------------------------------------------------------------

    def succeeded(self, endpoint: Endpoint, seconds: float, model: str) -> None:
        with self.cond:
            saturated = endpoint.in_flight >= int(endpoint.limit)
            endpoint.in_flight -= 1
            endpoint.successes += 1
            endpoint.failures_in_a_row = 0
            endpoint.last_success = time.monotonic()
            endpoint.served_model = model or endpoint.served_model
            avg = seconds if endpoint.latency_avg is None else 0.8 * endpoint.latency_avg + 0.2 * seconds
            endpoint.latency_avg = avg
            endpoint.recent.append(seconds)
            holds = avg <= GROW_WHILE * min(endpoint.recent) + LATENCY_SLACK
            if saturated and holds and endpoint.limit < self.maximum:
                endpoint.limit = min(float(self.maximum), endpoint.limit + GROW_STEP / endpoint.limit)
            self.cond.notify_all()

    def failed(self, endpoint: Endpoint, failure: RemoteFailure, *, endpoint_fault: bool = True) -> None:
        """Count ``failure`` against ``endpoint``; take it out if it is the endpoint's.
        ``endpoint_fault=False``: a drop or timeout that is the image's, listed but not held against it."""
        with self.cond:
            endpoint.in_flight -= 1
            endpoint.errors[failure.kind.value] += 1
            if failure.kind is Kind.OVERLOAD:
                endpoint.limit = max(1.0, endpoint.limit / 2)
                if failure.retry_after:
                    endpoint.paused_until = max(endpoint.paused_until, time.monotonic() + failure.retry_after)
            elif failure.kind in (Kind.CONNECT, Kind.TLS, Kind.AUTH, Kind.MODEL):
                self._trip(endpoint, str(failure))
            elif failure.kind is Kind.UNSUPPORTED:
                self._unsupported(endpoint, failure)
            elif failure.kind in (Kind.DROPPED, Kind.TIMEOUT) and not endpoint_fault:
                pass  # the image's doing: neither a failure of the endpoint's nor an answer
            elif failure.kind in (Kind.SERVER, Kind.DROPPED, Kind.TIMEOUT):
                endpoint.failures_in_a_row += 1
                if endpoint.failures_in_a_row >= self.failures_to_trip:
                    self._trip(endpoint, f"{endpoint.failures_in_a_row} failures in a row, the last: {failure}")
            else:
                endpoint.failures_in_a_row = 0  # a 4xx is an answer: the server is up
            self.cond.notify_all()

    def _unsupported(self, endpoint: Endpoint, failure: RemoteFailure) -> None:
        """The endpoint refused a request parameter: leave it out, or take the endpoint out."""
        endpoint.failures_in_a_row = 0  # it answered: the server is up
        if failure.param in OPTIONAL_PARAMETERS:
            if failure.param not in endpoint.omits:
                endpoint.omits.add(failure.param)
                log.warning(
                    "endpoint refuses a request parameter; it is no longer sent there",
                    endpoint=endpoint.url,
                    parameter=failure.param,
                    meaning=OPTIONAL_PARAMETERS[failure.param],
                    server_said=str(failure),
                )
            return
        reason = (
            f"it refuses the request as phicapd sends it ({failure}); it stays out until phicapd "
            "restarts: change the server's flags, or the [remote]/[model] setting it names"
        )
        endpoint.refused = reason
        self._trip(endpoint, reason)

    def answered(self, endpoint: Endpoint) -> None:
        """``endpoint`` captioned a probe image: it answers images, as after a success."""
        with self.cond:
            endpoint.failures_in_a_row = 0
            endpoint.last_success = time.monotonic()

    def answered_since(self, endpoint: Endpoint, since: float) -> bool:
        """Whether ``endpoint`` answered an image with a caption after ``since`` (monotonic)."""
        with self.cond:
            return endpoint.last_success > since

    def _trip(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.up:
            log.warning("endpoint down; its requests go to the others", endpoint=endpoint.url, reason=reason)
        endpoint.up = False
        endpoint.reason = reason
        endpoint.next_probe = time.monotonic() + self.probe_interval

    # -- health --------------------------------------------------------------------------------

    def check(self, endpoint: Endpoint) -> None:
        """``GET /models``: raises ``RemoteFailure`` unless the endpoint answers and serves our model."""
        status, headers, data = self.http.request(endpoint.target, "GET", "/models")
        if status != 200:
            raise classify(status, data, headers)
        models = served_models(data)
        if self.model not in models:
            raise RemoteFailure(Kind.MODEL, f"serves {', '.join(models) or 'no model'}, not {self.model!r}")

    def probe(self, endpoint: Endpoint) -> bool:
        """Check a down endpoint now; back in (limit starting over) if it passes."""
        try:
            self.check(endpoint)
        except RemoteFailure as e:
            with self.cond:
                endpoint.reason = str(e)
                endpoint.next_probe = time.monotonic() + self.probe_interval
            return False
        with self.cond:
            endpoint.up = True
            endpoint.reason = None
            endpoint.failures_in_a_row = 0
            endpoint.paused_until = 0.0
            endpoint.limit = float(self.initial)
            self.cond.notify_all()
        log.info("endpoint up", endpoint=endpoint.url)
        return True

    def mark_down(self, endpoint: Endpoint, reason: str) -> None:
        with self.cond:
            self._trip(endpoint, reason)

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            now = time.monotonic()
            with self.cond:
                due = [e for e in self.endpoints if not e.up and e.refused is None and e.next_probe <= now]
            for endpoint in due:
                self.probe(endpoint)
            self._closed.wait(min(0.5, self.probe_interval / 2))
        self.http.close()

    # -- status --------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self.cond:
            return [
                {
                    "url": e.url,
                    "up": e.up,
                    "reason": e.reason,
                    "in_flight": e.in_flight,
                    "limit": int(e.limit),
                    "paused_seconds": round(max(0.0, e.paused_until - now), 1),
                    "latency_ms": round(e.latency_avg * 1000, 1) if e.latency_avg is not None else None,
                    "requests": e.requests,
                    "successes": e.successes,
                    "errors": sum(e.errors.values()),
                    "errors_by_kind": dict(e.errors),
                    "served_model": e.served_model,
                    "omits": sorted(e.omits),
                }
                for e in self.endpoints
            ]
