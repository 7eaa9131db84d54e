"""The server survives load and hostile clients, and keeps serving afterwards."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from phicapd.config import ControlSettings
from phicapd.control import server as server_module
from phicapd.control.client import ControlClient, RequestFailed, RequestRejected
from phicapd.control.server import ControlServer
from tests.control.fakes import FakeBackend


def raw_exchange(path: Path, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes; b"" if it closed without answering."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    out = b""
    try:
        # The server may answer and close before it read everything (431, 413, 503): the
        # send then fails, but the answer is already in our receive buffer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    finally:
        s.close()
    return out


def status_line(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0].decode()


def error_code(reply: bytes) -> str:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"]


def assert_serving(path: Path) -> None:
    with ControlClient(path, timeout=5) as client:
        assert client.status().state == "ready"


def test_64_clients_x_100_status_calls(server: ControlServer, settings: ControlSettings) -> None:
    errors: list[BaseException] = []

    def worker() -> int:
        ok = 0
        with ControlClient(settings.socket, timeout=10) as client:
            for _ in range(100):
                try:
                    assert client.status().state == "ready"
                    ok += 1
                except BaseException as e:
                    errors.append(e)
        return ok

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda _: worker(), range(64)))
    assert errors == []
    assert sum(results) == 6400


def test_huge_header_line_is_refused(server: ControlServer, settings: ControlSettings) -> None:
    head = b"GET /v1/status HTTP/1.1\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    reply = raw_exchange(settings.socket, head)
    assert reply == b"" or status_line(reply) == "HTTP/1.1 431 Request Header Fields Too Large"
    assert reply, "expected a 431 answer, not a reset"
    assert error_code(reply) == "headers_too_large"
    assert_serving(settings.socket)


def test_body_over_the_cap_is_refused_before_reading(server: ControlServer, settings: ControlSettings) -> None:
    head = f"POST /v1/caption HTTP/1.1\r\nContent-Length: {settings.max_body_bytes + 1}\r\n\r\n".encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(settings.socket))
    s.sendall(head)  # no body at all: the answer must not wait for it
    reply = s.recv(65536)
    s.close()
    assert status_line(reply).split(" ")[1] == "413"
    assert error_code(reply) == "payload_too_large"
    assert_serving(settings.socket)


def test_client_sending_a_big_body_gets_the_413(
    server: ControlServer, settings: ControlSettings, backend: FakeBackend
) -> None:
    with ControlClient(settings.socket) as client, pytest.raises(RequestRejected) as exc:
        client.caption_bytes(b"\x89PNG" + b"x" * (4 * settings.max_body_bytes), name="big.png")
    assert exc.value.status == 413
    assert exc.value.code == "payload_too_large"
    assert_serving(settings.socket)


def test_slowloris_is_cut_off(sock_dir: Path, backend: FakeBackend) -> None:
    settings = ControlSettings(socket=sock_dir / "slow.sock", request_timeout_seconds=1.5)
    with ControlServer(settings, backend):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(settings.socket))
        stop = threading.Event()

        def trickle() -> None:
            for byte in b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n":
                if stop.wait(1.0):
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        started = time.monotonic()
        sender.start()
        s.settimeout(6)
        reply = s.recv(65536)
        elapsed = time.monotonic() - started
        stop.set()
        sender.join()
        s.close()
        assert status_line(reply) == "HTTP/1.1 408 Request Timeout"
        assert 1.2 < elapsed < 4
        # A well-behaved client was served meanwhile and still is.
        assert_serving(settings.socket)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\xff\xfe garbage \x01\x02\r\n\r\n", "400"),
        (b"GET\r\n\r\n", "400"),
        (b"GET /v1/status HTTP/9.9\r\n\r\n", "505"),
        (b"GET /v1/status HTTP/1.1\r\nno colon here\r\n\r\n", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nContent-Length: -5\r\n\r\n", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "501"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, "400"),
        (b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", "400"),  # closed mid-chunk
        (b"POST /v1/caption-url HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope", "400"),
        (b"POST /v1/caption-url HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", "400"),
        (b'POST /v1/caption-url HTTP/1.1\r\nContent-Length: 11\r\n\r\n{"url": 42}', "400"),
        (b"GET /v1/failures?limit=abc HTTP/1.1\r\n\r\n", "400"),
        (b"POST /v1/caption?max_new_tokens=0 HTTP/1.1\r\nContent-Length: 4\r\n\r\n\x89PNG", "400"),
        (b"POST /v1/caption HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "422"),  # image_empty
        (b"DELETE /v1/status HTTP/1.1\r\n\r\n", "405"),
        (b"GET /v1/caption HTTP/1.1\r\n\r\n", "405"),
        (b"GET /v2/status HTTP/1.1\r\n\r\n", "404"),
        (b"GET /v1/status HTTP/1.1\r\nX-Half: header", ""),  # closed mid-head
    ],
)
def test_malformed_requests_get_an_error(
    server: ControlServer, settings: ControlSettings, data: bytes, status: str
) -> None:
    reply = raw_exchange(settings.socket, data)
    if status:
        assert status_line(reply).split(" ")[1] == status, reply[:300]
        json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"]  # a JSON error body
    assert_serving(settings.socket)


def test_keep_alive_serves_several_requests_on_one_connection(server: ControlServer, settings: ControlSettings) -> None:
    req = b"GET /v1/version HTTP/1.1\r\nHost: phicapd\r\n\r\n"
    reply = raw_exchange(settings.socket, req * 3 + b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 4
    assert reply.rstrip().endswith(b'{"ready":true,"captioning":true,"state":"ready","reason":null}')


def test_expect_100_continue(server: ControlServer, settings: ControlSettings) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(settings.socket))
    s.sendall(b"POST /v1/caption?name=a.png HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"\x89PNG")
    reply = s.recv(65536)
    s.close()
    assert status_line(reply) == "HTTP/1.1 200 OK"


def test_connections_beyond_the_cap_get_503(sock_dir: Path, backend: FakeBackend) -> None:
    """Every slot holds a request in progress: a new connection gets 503 at once."""
    settings = ControlSettings(socket=sock_dir / "cap.sock", max_connections=2)
    gate = threading.Event()
    real_caption = backend.caption_bytes
    held: list[str] = []

    def held_caption(*args, **kwargs):  # type: ignore[no-untyped-def]
        held.append(kwargs["name"])
        assert gate.wait(10)
        return real_caption(*args, **kwargs)

    backend.caption_bytes = held_caption  # type: ignore[method-assign]
    with ControlServer(settings, backend), ThreadPoolExecutor(2) as pool:
        try:
            busy = [
                pool.submit(
                    raw_exchange,
                    settings.socket,
                    b"POST /v1/caption?name=a.png HTTP/1.1\r\nContent-Length: 4\r\n\r\n\x89PNG",
                )
                for _ in range(2)
            ]
            deadline = time.monotonic() + 5
            while len(held) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(server_module.CUT_AFTER_SECONDS)  # no slot would be cut for its head either
            reply = raw_exchange(settings.socket, b"GET /v1/status HTTP/1.1\r\n\r\n")
            assert status_line(reply) == "HTTP/1.1 503 Service Unavailable"
            assert error_code(reply) == "busy"
            with ControlClient(settings.socket) as client, pytest.raises(RequestFailed) as exc:
                client.status()
            assert (exc.value.status, exc.value.code, exc.value.retryable) == (503, "busy", True)
        finally:
            gate.set()
        assert [status_line(f.result()) for f in busy] == ["HTTP/1.1 200 OK"] * 2
        deadline = time.monotonic() + 3
        while True:  # the slots free up as soon as the server sees the closes
            reply = raw_exchange(settings.socket, b"GET /v1/status HTTP/1.1\r\n\r\n")
            if status_line(reply).endswith("200 OK") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status_line(reply) == "HTTP/1.1 200 OK"


def test_slow_connections_beyond_the_cap_never_starve_real_clients(sock_dir: Path, backend: FakeBackend) -> None:
    """Issue 18: 140 slow connections (over max_connections) left real clients 8 answers of 64."""
    settings = ControlSettings(
        socket=sock_dir / "slow.sock", max_connections=32, request_timeout_seconds=60, head_timeout_seconds=60
    )
    with ControlServer(settings, backend) as server:
        slow: list[socket.socket] = []
        try:
            for i in range(140):  # half send nothing, half the start of a head and no more
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(settings.socket))
                if i % 2:
                    s.send(b"GET /v1/status HTTP/1.1\r\nHost: ")
                slow.append(s)
            deadline = time.monotonic() + 10
            while len(server._heads) < settings.max_connections and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(server._heads) == settings.max_connections  # every slot is a slow one
            time.sleep(server_module.CUT_AFTER_SECONDS)

            def client_calls(_: int) -> int:
                with ControlClient(settings.socket, timeout=10) as client:
                    return sum(client.status().state == "ready" for _ in range(8))

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                answered = sum(pool.map(client_calls, range(8)))
            elapsed = time.monotonic() - started
        finally:
            for s in slow:
                s.close()
    assert answered == 64
    assert elapsed < 10  # far below the 60 s the slow ones could otherwise hold their slots


def test_a_connection_that_sends_no_head_is_cut_after_the_head_timeout(sock_dir: Path, backend: FakeBackend) -> None:
    settings = ControlSettings(socket=sock_dir / "head.sock", request_timeout_seconds=30, head_timeout_seconds=0.3)
    with ControlServer(settings, backend):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(settings.socket))
        started = time.monotonic()
        assert s.recv(100) == b""  # closed quietly, as an idle connection
        elapsed = time.monotonic() - started
        s.close()
        assert 0.25 < elapsed < 5
        # A request whose head arrives in time may take longer for its body (request_timeout).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(settings.socket))
        s.sendall(b"POST /v1/caption?name=a.png HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\x89P")
        time.sleep(0.6)
        s.sendall(b"NG")
        reply = s.recv(65536)
        s.close()
        assert status_line(reply) == "HTTP/1.1 200 OK"


def _chunked(body: bytes, sizes: list[int], *, extension: bytes = b"", trailer: bytes = b"") -> bytes:
    out, at = b"", 0
    for n in sizes:
        out += b"%x%s\r\n" % (n, extension) + body[at : at + n] + b"\r\n"
        at += n
    return out + b"0\r\n" + trailer + b"\r\n"


def test_chunked_uploads_are_read_and_the_connection_stays_usable(
    server: ControlServer, settings: ControlSettings, backend: FakeBackend
) -> None:
    body = b"\x89PNG" + bytes(range(256)) * 40
    head = b"POST /v1/caption?name=c.png HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = _chunked(body, [1, 4096, 3000, len(body) - 7097], extension=b";x=1", trailer=b"X-Sum: 1\r\n")
    reply = raw_exchange(settings.socket, head + chunks + b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b"caption of c.png (%d bytes)" % len(body) in reply
    assert backend.received[-1] == ("c.png", body)
    assert server.body_budget.held == 0


def test_a_chunked_body_over_the_limit_is_refused(backend: FakeBackend, sock_dir: Path) -> None:
    small = ControlSettings(socket=sock_dir / "s.sock", max_body_bytes=1000)
    with ControlServer(small, backend) as server:
        head = b"POST /v1/caption HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        reply = raw_exchange(small.socket, head + _chunked(b"x" * 1500, [800, 700]))
        assert status_line(reply).split(" ")[1] == "413" and error_code(reply) == "payload_too_large"
        assert server.body_budget.held == 0
        assert_serving(small.socket)


# Every endpoint that reads a JSON body (the others take raw bytes or ignore their body).
JSON_ENDPOINTS = ["/v1/caption-url", "/v1/failures/retry"]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000])
def test_deeply_nested_json_is_a_400_not_an_internal_error(
    server: ControlServer, settings: ControlSettings, path: str, body: bytes
) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(settings.socket, head.encode() + body)
    assert status_line(reply) == "HTTP/1.1 400 Bad Request"
    detail = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert detail["code"] == "bad_request" and "nested too deeply" in detail["message"]
    assert_serving(settings.socket)
