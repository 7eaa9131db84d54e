"""Every endpoint through the client, readiness, and how backend errors map onto HTTP."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd import __version__
from phicapd.config import ControlSettings
from phicapd.control.client import ControlClient, RequestFailed, RequestRejected
from phicapd.control.server import ControlServer
from tests.control.fakes import FakeBackend


@pytest.fixture
def client(server: ControlServer, settings: ControlSettings) -> Iterator[ControlClient]:
    with ControlClient(settings.socket) as c:
        yield c


def test_caption_bytes_carries_bytes_and_parameters(client: ControlClient, backend: FakeBackend) -> None:
    data = b"\x89PNG" + bytes(range(256)) * 10
    result = client.caption_bytes(data, name="photo ü.png", prompt="Say & so?", max_new_tokens=33)
    assert result.caption == "caption of photo ü.png (2564 bytes) for 'Say & so?'"
    assert (result.new_tokens, result.model) == (33, "fake@1")
    assert backend.received == [("photo ü.png", data)]


def test_caption_url(client: ControlClient) -> None:
    result = client.caption_url("https://example.com/cat.jpg", prompt="short")
    assert result.caption == "caption of https://example.com/cat.jpg"
    assert result.url == "https://example.com/cat.jpg"


@pytest.mark.parametrize(
    ("data", "status", "code", "error"),
    [
        (b"BAD bytes", 422, "image_unsupported", RequestRejected),
        (b"FAIL bytes", 500, "caption_failed", RequestFailed),
    ],
)
def test_backend_errors_keep_their_code(
    client: ControlClient, data: bytes, status: int, code: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as exc:
        client.caption_bytes(data, name="x.jpg")
    assert (exc.value.status, exc.value.code) == (status, code)  # type: ignore[attr-defined]


def test_long_caption_on_a_reused_connection(sock_dir: Path, backend: FakeBackend) -> None:
    """The caption timeout applies even when the connection was opened with the short one."""
    backend.delay = 0.5
    settings = ControlSettings(socket=sock_dir / "c.sock")
    with ControlServer(settings, backend), ControlClient(settings.socket, timeout=0.2, caption_timeout=5) as c:
        assert c.status().state == "ready"
        assert c.caption_bytes(b"\x89PNG", name="slow.png").caption.startswith("caption of slow.png")
        assert c.status().state == "ready"


def test_idle_keep_alive_connection_is_closed_quietly(sock_dir: Path, backend: FakeBackend) -> None:
    settings = ControlSettings(socket=sock_dir / "c.sock", request_timeout_seconds=0.3)
    with ControlServer(settings, backend), ControlClient(settings.socket) as c:
        assert c.version().api == 1
        time.sleep(0.6)  # the server has dropped the idle connection; the client reconnects
        assert c.version().api == 1


def test_refused_url_is_rejected(client: ControlClient) -> None:
    with pytest.raises(RequestRejected) as exc:
        client.caption_url("http://refused.example/")
    assert (exc.value.status, exc.value.code) == (422, "url_address_refused")


def test_control_endpoints(client: ControlClient, backend: FakeBackend) -> None:
    status = client.status()
    assert status.state == "ready"
    assert status.sidecar.existing == "skip"
    assert status.model_dump()["lanes"] == {"interactive": 0, "background": 3}
    assert len(client.failures(limit=2)) == 2
    assert client.retry() == 3
    assert client.retry(["/a.jpg"]) == 1
    assert backend.retried == [None, ["/a.jpg"]]
    client.pause()
    assert backend.paused
    client.resume()
    assert not backend.paused
    client.rescan()
    assert backend.rescans == 1
    assert client.version().version == __version__
    metrics = client.metrics()
    assert "phicapd_images_total 42\n" in metrics
    assert 'phicapd_control_requests_total{status="200"}' in metrics


def test_loading_daemon_answers_status_and_health(client: ControlClient, backend: FakeBackend) -> None:
    backend.ready.clear()
    assert client.status().state == "loading"
    assert client.health() is False
    assert client.version().api == 1


def test_caption_waits_for_readiness(client: ControlClient, backend: FakeBackend) -> None:
    backend.ready.clear()
    timer = threading.Timer(0.3, backend.ready.set)
    timer.start()
    started = time.monotonic()
    result = client.caption_bytes(b"\x89PNG", name="wait.png")
    assert time.monotonic() - started >= 0.25
    assert result.caption.startswith("caption of wait.png")


def test_caption_gives_up_when_the_model_never_gets_ready(sock_dir: Path, backend: FakeBackend) -> None:
    backend.ready.clear()
    settings = ControlSettings(socket=sock_dir / "c.sock", caption_timeout_seconds=0.3)
    with ControlServer(settings, backend), ControlClient(settings.socket) as client:
        with pytest.raises(RequestFailed) as exc:
            client.caption_bytes(b"\x89PNG", name="never.png")
        assert (exc.value.status, exc.value.code, exc.value.retryable) == (503, "not_ready", True)
    assert backend.received == []


def test_backend_crash_is_a_500_not_a_dead_server(client: ControlClient, backend: FakeBackend) -> None:
    def boom(limit: int) -> list[dict[str, object]]:
        raise RuntimeError("bug")

    backend.failures = boom  # type: ignore[method-assign]
    with pytest.raises(RequestFailed) as exc:
        client.failures()
    assert (exc.value.status, exc.value.code) == (500, "internal")
    assert client.status().state == "ready"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_works(server: ControlServer, settings: ControlSettings) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(settings.socket), "http://phicapd/v1/health"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert out.stdout == '{"ready":true,"captioning":true,"state":"ready","reason":null}'
    out = subprocess.run(
        [
            "curl", "-sS", "--unix-socket", str(settings.socket), "--data-binary", "@-",
            "http://phicapd/v1/caption?name=c.png",
        ],
        input=b"\x89PNG" + b"z" * 5000,
        capture_output=True,
        timeout=10,
        check=True,
    )  # fmt: skip
    assert b"caption of c.png (5004 bytes)" in out.stdout
    # Piped from stdin (-T -) curl sends the body chunked, with Expect: 100-continue.
    out = subprocess.run(
        [
            "curl", "-sS", "--unix-socket", str(settings.socket), "-X", "POST", "-T", "-",
            "http://phicapd/v1/caption?name=t.png",
        ],
        input=b"\x89PNG" + b"t" * 70000,
        capture_output=True,
        timeout=10,
        check=True,
    )  # fmt: skip
    assert b"caption of t.png (70004 bytes)" in out.stdout
