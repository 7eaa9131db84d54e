"""The daemon-wide request-body budget: uploads beyond it get 503 busy, nothing leaks."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from phicapd.config import ControlSettings
from phicapd.control.backend import CaptionReply
from phicapd.control.client import ControlClient, RequestFailed, RequestRejected
from phicapd.control.server import MAX_BODY_BYTES_HELD, BodyBudget, ControlServer
from tests.control.fakes import GOOD_MAGIC, FakeBackend
from tests.support.metrics import sample

BODY = 300_000
BUDGET = 3 * BODY + 100_000  # three uploads fit, a fourth does not; small bodies still do


class GatedBackend(FakeBackend):
    """Holds every caption until ``gate`` opens, so admitted uploads keep their reservation."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = 0
        self._entered_lock = threading.Lock()

    def caption_bytes(self, data: bytes, **kwargs: Any) -> CaptionReply:
        with self._entered_lock:
            self.entered += 1
        assert self.gate.wait(20), "the test never opened the gate"
        return super().caption_bytes(data, **kwargs)


@pytest.fixture
def gated() -> Iterator[GatedBackend]:
    backend = GatedBackend()
    yield backend
    backend.gate.set()  # never leave server threads waiting


@pytest.fixture
def budget_server(settings: ControlSettings, gated: GatedBackend) -> Iterator[ControlServer]:
    srv = ControlServer(settings, gated, body_budget_bytes=BUDGET)
    srv.start()
    yield srv
    gated.gate.set()
    srv.stop()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def connect(path: Path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def caption_head(length: int, *, extra: str = "") -> bytes:
    return f"POST /v1/caption?name=u.png HTTP/1.1\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def image(size: int) -> bytes:
    return GOOD_MAGIC + b"x" * (size - len(GOOD_MAGIC))


def error_of(reply: bytes) -> dict[str, Any]:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


# -- the budget itself ---------------------------------------------------------------------------


def test_budget_reserves_and_releases() -> None:
    budget = BodyBudget(100)
    assert budget.reserve(0)
    assert budget.reserve(60)
    assert not budget.reserve(41)
    assert budget.held == 60  # a refused reservation takes nothing
    assert budget.reserve(40)
    assert budget.reserve(0)  # a request without a body always fits
    assert not budget.reserve(1)
    budget.release(60)
    budget.release(40)
    budget.release(0)
    assert budget.held == 0
    with pytest.raises(RuntimeError):
        budget.release(1)
    with pytest.raises(ValueError):
        BodyBudget(0)


def test_budget_under_contention_never_exceeds_its_limit() -> None:
    budget = BodyBudget(1000)
    peak = 0
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal peak
        for _ in range(2000):
            if budget.reserve(n):
                with lock:
                    peak = max(peak, budget.held)
                budget.release(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (100, 300, 450, 700)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.held == 0
    assert peak <= 1000


def test_default_budget_fits_the_largest_body(sock_dir: Path, backend: FakeBackend) -> None:
    small = ControlServer(ControlSettings(socket=sock_dir / "a.sock"), backend)
    big = ControlServer(ControlSettings(socket=sock_dir / "b.sock", max_body_bytes=2 * MAX_BODY_BYTES_HELD), backend)
    try:
        assert small.body_budget.limit == MAX_BODY_BYTES_HELD
        assert big.body_budget.limit == 2 * MAX_BODY_BYTES_HELD
    finally:
        small.stop()
        big.stop()


# -- (1) concurrent uploads beyond the budget, (3) small requests meanwhile ----------------------------


def test_concurrent_uploads_beyond_the_budget(
    budget_server: ControlServer, settings: ControlSettings, gated: GatedBackend
) -> None:
    n = 10
    clients = [ControlClient(settings.socket, timeout=20, caption_timeout=20) for _ in range(n)]
    outcomes: list[object] = [None] * n

    def upload(i: int) -> None:
        try:
            outcomes[i] = clients[i].caption_bytes(image(BODY), name=f"{i}.png")
        except RequestFailed as e:
            outcomes[i] = e

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    refused = lambda: [o for o in outcomes if isinstance(o, RequestFailed)]  # noqa: E731
    # Exactly three fit; they wait at the gate holding their bytes, the others are turned away.
    wait_for(lambda: gated.entered == 3 and len(refused()) == n - 3, timeout=15)
    assert budget_server.body_budget.held == 3 * BODY
    for e in refused():
        assert isinstance(e, RequestFailed)
        assert (e.status, e.code, e.retryable) == (503, "busy", True)
        assert "request bodies" in e.message

    # (3) With the budget mostly used, requests without a body or with a small one still go through.
    with ControlClient(settings.socket, timeout=10) as client:
        assert client.status().state == "ready"
        assert client.health() is True
        assert client.version().version
        assert client.retry(["/srv/photos/1.jpg"]) == 1  # a small JSON body
        assert client.caption_url("https://example.com/a.jpg").caption == "caption of https://example.com/a.jpg"
        metrics = client.metrics()
    assert sample(metrics, "phicapd_control_body_bytes") == 3 * BODY
    assert sample(metrics, "phicapd_control_body_bytes_limit") == BUDGET
    assert sample(metrics, "phicapd_control_rejected_bodies_total") == n - 3

    gated.gate.set()
    for t in threads:
        t.join(20)
    done = [o for o in outcomes if not isinstance(o, RequestFailed)]
    assert len(done) == 3
    assert all(o is not None and f"({BODY} bytes)" in o.caption for o in done)  # type: ignore[attr-defined]
    wait_for(lambda: budget_server.body_budget.held == 0)

    # Refused clients may simply retry, as the error says.
    with ControlClient(settings.socket, timeout=10) as client:
        assert f"({BODY} bytes)" in client.caption_bytes(image(BODY), name="again.png").caption
    for c in clients:
        c.close()
    wait_for(lambda: budget_server.body_budget.held == 0)


def test_refused_upload_is_answered_without_reading_the_body(
    budget_server: ControlServer, settings: ControlSettings, gated: GatedBackend
) -> None:
    with ControlClient(settings.socket, timeout=20, caption_timeout=20) as holder:
        first = threading.Thread(target=holder.caption_bytes, args=(image(BUDGET - 1000),), kwargs={"name": "h.png"})
        first.start()
        wait_for(lambda: gated.entered == 1)
        # The head alone, no body: the 503 must come without waiting for the body.
        s = connect(settings.socket)
        s.sendall(caption_head(2000, extra="Expect: 100-continue\r\n"))
        reply = read_all(s)  # the server closes the connection after the reply
        s.close()
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nConnection: close\r\n" in reply
        assert b"100 Continue" not in reply
        assert error_of(reply)["code"] == "busy"
        assert error_of(reply)["retryable"] is True
        # A body over the endpoint's cap is still a 413, not a retryable busy.
        s = connect(settings.socket)
        s.sendall(caption_head(settings.max_body_bytes + 1))
        reply = read_all(s)
        s.close()
        assert reply.startswith(b"HTTP/1.1 413 ")
        # A small body still fits next to the big one: it is admitted and reaches the backend.
        with ControlClient(settings.socket, timeout=20, caption_timeout=20) as client:
            small: list[str] = []
            second = threading.Thread(
                target=lambda: small.append(client.caption_bytes(image(900), name="small.png").caption)
            )
            second.start()
            wait_for(lambda: gated.entered == 2)
            assert budget_server.body_budget.held == BUDGET - 1000 + 900
            gated.gate.set()
            first.join(10)
            second.join(10)
            assert small == ["caption of small.png (900 bytes)"]
    wait_for(lambda: budget_server.body_budget.held == 0)


# -- (2) aborted and failed requests give their bytes back ---------------------------------------


def test_aborted_uploads_release_their_reservation(
    budget_server: ControlServer, settings: ControlSettings, gated: GatedBackend
) -> None:
    budget = budget_server.body_budget
    gated.gate.set()
    for i in range(20):
        length = BODY + i
        s = connect(settings.socket)
        if i % 3 == 0:  # head and half the body
            s.sendall(caption_head(length) + image(length)[: length // 2])
        elif i % 3 == 1:  # the head only
            s.sendall(caption_head(length))
        else:  # Expect: 100-continue, then a few bytes
            s.sendall(caption_head(length, extra="Expect: 100-continue\r\n"))
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(GOOD_MAGIC)
        wait_for(lambda length=length: budget.held == length)  # reserved while the body arrives
        s.close()
        wait_for(lambda: budget.held == 0)
    # Many aborted at once, interleaved with a few that complete.
    socks = []
    for i in range(3):
        s = connect(settings.socket)
        s.sendall(caption_head(BODY) + image(BODY)[: BODY // 3 + i])
        socks.append(s)
    wait_for(lambda: budget.held == 3 * BODY)
    with ControlClient(settings.socket, timeout=10) as client:
        with pytest.raises(RequestFailed) as exc:
            client.caption_bytes(image(BODY), name="full.png")
        assert exc.value.code == "busy"
        for s in socks:
            s.close()
        wait_for(lambda: budget.held == 0)
        assert "(1000 bytes)" in client.caption_bytes(image(1000), name="ok.png").caption
    # The whole budget is free again: one upload of exactly its size fits.
    assert settings.max_body_bytes >= BUDGET
    with ControlClient(settings.socket, timeout=10) as client:
        assert f"({BUDGET} bytes)" in client.caption_bytes(image(BUDGET), name="all.png").caption
    wait_for(lambda: budget.held == 0)


def test_failed_requests_release_their_reservation(
    budget_server: ControlServer, settings: ControlSettings, gated: GatedBackend
) -> None:
    budget = budget_server.body_budget
    gated.gate.set()
    with ControlClient(settings.socket, timeout=10) as client:
        for i in range(10):
            # Rejected by the router after the body was read (bad parameter, bad image, failure).
            with pytest.raises((RequestRejected, RequestFailed), match=r"max_new_tokens|not an image|failed"):
                if i % 3 == 0:
                    client.caption_bytes(image(BODY), name="p.png", max_new_tokens=0)
                elif i % 3 == 1:
                    client.caption_bytes(b"BAD" + b"x" * BODY, name="bad.png")
                else:
                    client.caption_bytes(b"FAIL" + b"x" * BODY, name="fail.png")
            wait_for(lambda: budget.held == 0)
    # The client sends the whole body and goes away before the reply.
    gated.gate.clear()
    for _ in range(5):
        s = connect(settings.socket)
        entered = gated.entered
        s.sendall(caption_head(BODY) + image(BODY))
        wait_for(lambda entered=entered: gated.entered == entered + 1)  # the body was read
        assert budget.held == BODY
        s.close()
        gated.gate.set()  # the reply then goes to a closed socket
        wait_for(lambda: budget.held == 0)
        gated.gate.clear()
    gated.gate.set()
    # Malformed, too large, unknown: refused before any reservation or after it, never kept.
    for data in (
        caption_head(settings.max_body_bytes + 1),
        b"POST /v1/nowhere HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10,
        b"POST /v1/caption HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 11\r\n\r\n",
    ):
        s = connect(settings.socket)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the GET's body ends early: a 400
        assert read_all(s).split(b" ", 2)[1] in (b"400", b"404", b"413")
        s.close()
        wait_for(lambda: budget.held == 0)


def test_timed_out_uploads_release_their_reservation(sock_dir: Path, gated: GatedBackend) -> None:
    settings = ControlSettings(socket=sock_dir / "t.sock", max_body_bytes=BUDGET, request_timeout_seconds=0.4)
    gated.gate.set()
    with ControlServer(settings, gated, body_budget_bytes=BUDGET) as srv:
        socks = []
        for _ in range(3):
            s = connect(settings.socket)
            s.sendall(caption_head(BODY) + image(BODY)[:1000])  # and then nothing: a slow client
            socks.append(s)
        wait_for(lambda: srv.body_budget.held == 3 * BODY)
        for s in socks:
            reply = read_all(s)
            s.close()
            assert reply.startswith(b"HTTP/1.1 408 ")
        wait_for(lambda: srv.body_budget.held == 0)
        # Connections cut by stop() while a body arrives give their bytes back too.
        s = connect(settings.socket)
        s.sendall(caption_head(BODY) + image(BODY)[:1000])
        wait_for(lambda: srv.body_budget.held == BODY)
    assert srv.body_budget.held == 0
    s.close()


def test_many_small_requests_beside_a_held_upload(
    budget_server: ControlServer, settings: ControlSettings, gated: GatedBackend
) -> None:
    with ControlClient(settings.socket, timeout=20, caption_timeout=20) as holder:
        big = threading.Thread(target=holder.caption_bytes, args=(image(2 * BODY),), kwargs={"name": "big.png"})
        big.start()
        wait_for(lambda: gated.entered == 1)

        def worker(_: int) -> int:
            ok = 0
            with ControlClient(settings.socket, timeout=10) as client:
                for j in range(15):
                    assert client.status().state == "ready"
                    assert client.health() is True
                    assert client.retry([f"/srv/{j}.jpg"]) == 1
                    ok += 1
            return ok

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(worker, range(8))) == 8 * 15
        assert budget_server.body_budget.held == 2 * BODY
        gated.gate.set()
        big.join(10)
    wait_for(lambda: budget_server.body_budget.held == 0)
