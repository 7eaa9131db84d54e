"""The URL matrix against a local server on 127.0.0.1 (reachable only through allow_networks)."""

from __future__ import annotations

import gzip
import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from phicapd import fetch
from phicapd.config import FetchSettings
from phicapd.errors import FetchError
from phicapd.fetch import AddressPolicy, fetch_url

PUBLIC_IP = "93.184.215.14"  # never contacted: the connect spy refuses everything but 127.0.0.1
LOOPBACK_ONLY = ["127.0.0.1/32"]
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"not really, the decoder sniffs later"


@dataclass
class ServerState:
    requests: list[dict[str, str]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    gzip_bomb: bytes = b""


def _gzip_of_zeros(megabytes: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1024 * 1024)
    return b"".join([compressor.compress(block) for _ in range(megabytes)] + [compressor.flush()])


class Handler(http.server.BaseHTTPRequestHandler):
    server: LocalServer

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream_zeros(self, route: str) -> None:
        """Write zeros until the client goes away; count what was written."""
        block = b"\0" * 65536
        sent = 0
        try:
            while sent < 200 * 1024 * 1024:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass
        finally:
            self.server.state.sent[route] = sent

    def _dribble(self, data: bytes, interval: float) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(interval)
        except OSError:
            pass

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        route = self.path.split("?")[0]
        if route.startswith("http://"):  # absolute form: we are being used as a proxy
            route = "/" + route.split("/", 3)[3]
        parts = route.strip("/").split("/")
        if route == "/img":
            self._reply(200, PNG_BYTES, {"Content-Type": "text/plain"})
        elif route == "/host":
            self._reply(200, self.headers["Host"].encode())
        elif parts[0] == "redirect":
            left = int(parts[1])
            if left == 0:
                self._reply(200, b"end of chain")
            else:
                self._reply(302, headers={"Location": f"/redirect/{left - 1}"})
        elif route == "/to-metadata":
            self._reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif parts[0] == "status":
            self._reply(int(parts[1]), b"nope")
        elif route == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self._dribble(b"x" * 100, 0.5)
        elif route == "/slow-headers":
            self._dribble(b"HTTP/1.0 200 OK\r\nX-Padding: " + b"a" * 100 + b"\r\n\r\n", 0.5)
        elif route == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(200 * 1024 * 1024))
            self.end_headers()
            self._stream_zeros(route)
        elif route == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            self._stream_zeros(route)
        elif route == "/gzip-bomb":
            self._reply(200, state.gzip_bomb, {"Content-Encoding": "gzip"})
        elif route == "/gzip-small":
            self._reply(200, gzip.compress(PNG_BYTES), {"Content-Encoding": "gzip"})
        elif route == "/brotli":
            self._reply(200, b"\x0b\x02\x80", {"Content-Encoding": "br"})
        else:
            self._reply(404)


class LocalServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ServerState()

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    return _gzip_of_zeros(200)  # 200 MB of zeros in about 200 KB


@pytest.fixture
def server(gzip_bomb: bytes) -> Iterator[LocalServer]:
    srv = LocalServer()
    srv.state.gzip_bomb = gzip_bomb
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address a socket connects to; anything but 127.0.0.1 is refused, never contacted."""
    seen: list[tuple[str, int]] = []
    real_connect = socket.socket.connect

    def spy(sock: socket.socket, address: tuple[str, int]) -> None:
        seen.append((address[0], address[1]))
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test refuses to contact {address[0]}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


class Resolver:
    """A recording resolver: every name maps to ``addresses`` (one list per call, last repeats)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = answers or (["127.0.0.1"],)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def _settings(**overrides: object) -> FetchSettings:
    base: dict[str, object] = {
        "max_bytes": 1024 * 1024,
        "connect_timeout_seconds": 2,
        "read_timeout_seconds": 5,
        "total_timeout_seconds": 10,
    }
    return FetchSettings(**(base | overrides))


def _allowed(**overrides: object) -> FetchSettings:
    """Settings under which the test server (and only it) is reachable."""
    return _settings(allow_networks=LOOPBACK_ONLY, **overrides)


def _refused(url: str, settings: FetchSettings | None = None, resolver: Callable | None = None) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch_url(url, settings or _settings(), resolver=resolver)
    return info.value


# --- URL shapes refused before any lookup or connection --------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "url_scheme"),
        ("ftp://127.0.0.1/img.jpg", "url_scheme"),
        ("gopher://img.test/", "url_scheme"),
        ("img.test/cat.jpg", "url_scheme"),
        ("http://user:pw@img.test/cat.jpg", "url_credentials"),
        ("http://@img.test/cat.jpg", "url_credentials"),
        ("http://img.test/a b.jpg", "url_invalid"),
        ("http://img.test\\@evil.test/", "url_invalid"),
        ("http://img.test:99999/", "url_invalid"),
        ("http:///nohost", "url_invalid"),
        ("http://1.2.3.4.5/", "url_invalid"),
        ("http://999.1.1.1/", "url_invalid"),
    ],
)
def test_bad_urls_are_refused_up_front(url: str, code: str, connects: list):
    resolver = Resolver()
    err = _refused(url, _allowed(), resolver)
    assert err.code == code
    assert resolver.calls == [] and connects == []
    assert "pw" not in str(err), "credentials are never echoed"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0x7F.0.0.1", "0177.0.0.1", "127.1", "[::1]", "[::ffff:127.0.0.1]"],
)
def test_loopback_in_any_spelling_is_refused(host: str, connects: list, server: LocalServer):
    resolver = Resolver()
    err = _refused(f"http://{host}:{server.port}/img", resolver=resolver)
    assert err.code == "url_address_refused"
    assert resolver.calls == [] and connects == []
    assert server.state.requests == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"])
def test_numeric_spellings_are_normalised_not_just_rejected(host: str, server: LocalServer):
    got = fetch_url(f"http://{host}:{server.port}/img", _allowed())
    assert got.data == PNG_BYTES


def test_resolved_loopback_is_refused_without_the_allow_list(connects: list, server: LocalServer):
    err = _refused(f"http://img.test:{server.port}/img", resolver=Resolver(["127.0.0.1"]))
    assert err.code == "url_address_refused"
    assert "img.test" in str(err) and "127.0.0.1" in str(err)
    assert connects == []


def test_the_refusal_names_the_setting_that_allows_a_network(connects: list, server: LocalServer):
    err = _refused(f"http://127.0.0.1:{server.port}/img")
    assert str(err) == (
        f"http://127.0.0.1:{server.port}/img: 127.0.0.1: loopback, refused; "
        "[fetch] allow_networks lists the networks to allow besides the public internet"
    )


def test_a_refused_connection_is_one_plain_line(server: LocalServer):
    with socket.socket() as bound:  # bound, never listening: connecting to it is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        err = _refused(f"http://img.test:{port}/img", _allowed(), resolver=Resolver())
    assert (err.code, str(err)) == ("url_connect_failed", f"http://img.test:{port}/img: img.test: connection refused")


def test_one_bad_address_among_good_ones_refuses_the_host(connects: list):
    err = _refused("http://mixed.test/img", resolver=Resolver([PUBLIC_IP, "10.0.0.7"]))
    assert err.code == "url_address_refused"
    assert connects == []


def test_dns_failure_is_retryable(connects: list):
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    err = _refused("http://nowhere.test/img", resolver=failing)
    assert (err.code, err.retryable) == ("url_dns_failed", True)


# --- the allowed path, pinning, proxies -------------------------------------------------------------


def test_fetch_through_the_allow_list_keeps_host_header(connects: list, server: LocalServer):
    settings = _allowed()
    got = fetch_url(f"http://img.test:{server.port}/host", settings, resolver=Resolver())
    assert got.data == f"img.test:{server.port}".encode()
    assert connects == [("127.0.0.1", server.port)]
    request = server.state.requests[0]
    assert request["accept-encoding"] == "identity"
    assert request["user-agent"] == "phicapd"


def test_content_type_is_advisory(server: LocalServer):
    got = fetch_url(f"http://img.test:{server.port}/img", _allowed(), resolver=Resolver())
    assert (got.data, got.content_type) == (PNG_BYTES, "text/plain")
    assert got.url == f"http://img.test:{server.port}/img"


def test_dns_rebinding_connects_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, connects: list, server: LocalServer
):
    # The system resolver answers a public address first, then the loopback server. An
    # implementation that resolved again at connect time would reach the server and succeed.
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        address = PUBLIC_IP if len(lookups) == 1 else "127.0.0.1"
        return real_getaddrinfo(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    err = _refused(f"http://rebind.test:{server.port}/img")
    assert (err.code, err.retryable) == ("url_connect_failed", True)
    assert lookups == ["rebind.test"]
    assert connects == [(PUBLIC_IP, server.port)]
    assert server.state.requests == []


def test_redirect_to_metadata_is_refused_before_connecting(connects: list, server: LocalServer):
    err = _refused(f"http://img.test:{server.port}/to-metadata", _allowed(), resolver=Resolver())
    assert err.code == "url_address_refused"
    assert "169.254.169.254" in str(err)
    assert connects == [("127.0.0.1", server.port)]


def test_redirect_chain_limit(server: LocalServer):
    settings = _allowed(max_redirects=5)
    got = fetch_url(f"http://img.test:{server.port}/redirect/5", settings, resolver=Resolver())
    assert got.data == b"end of chain" and got.url.endswith("/redirect/0")
    err = _refused(f"http://img.test:{server.port}/redirect/6", settings, Resolver())
    assert err.code == "url_too_many_redirects"
    assert len([r for r in server.state.requests if r["path"].startswith("/redirect/")]) == 6 + 6


def test_environment_proxies_are_ignored(monkeypatch: pytest.MonkeyPatch, connects: list, server: LocalServer):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    got = fetch_url(f"http://img.test:{server.port}/img", _allowed(), resolver=Resolver())
    assert got.data == PNG_BYTES
    assert connects == [("127.0.0.1", server.port)]


def test_configured_proxy_gets_the_checked_ip_as_target(connects: list, server: LocalServer):
    settings = _settings(proxy=f"http://127.0.0.1:{server.port}")
    got = fetch_url("http://images.example/img", settings, resolver=Resolver([PUBLIC_IP]))
    assert got.data == PNG_BYTES
    assert connects == [("127.0.0.1", server.port)]  # only the proxy
    (request,) = server.state.requests
    assert request["path"] == f"http://{PUBLIC_IP}/img"
    assert request["host"] == "images.example"


# --- deadlines and caps ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/slow-body", "/slow-headers"])
def test_one_byte_at_a_time_is_cut_at_the_total_deadline(route: str, server: LocalServer):
    # Each byte arrives well within the read timeout; only the total deadline can stop this.
    settings = _allowed(read_timeout_seconds=5, total_timeout_seconds=1.5)
    started = time.monotonic()
    err = _refused(f"http://img.test:{server.port}{route}", settings, Resolver())
    elapsed = time.monotonic() - started
    assert (err.code, err.retryable) == ("url_timeout", True)
    assert 1.4 < elapsed < 3.0


@pytest.mark.parametrize("route", ["/big", "/big-no-length"])
def test_200_mb_body_is_cut_at_the_cap(route: str, server: LocalServer):
    started = time.monotonic()
    err = _refused(f"http://img.test:{server.port}{route}", _allowed(), resolver=Resolver())
    assert err.code == "url_too_large"
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 3
    while route not in server.state.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.sent[route] < 32 * 1024 * 1024, "the server never had to produce 200 MB"


def test_content_length_over_the_cap_is_refused_before_reading(server: LocalServer):
    err = _refused(f"http://img.test:{server.port}/big", _allowed(), resolver=Resolver())
    assert "Content-Length" in str(err)


def test_gzip_bomb_is_cut_at_the_cap(server: LocalServer, gzip_bomb: bytes):
    assert len(gzip_bomb) < 1024 * 1024  # small on the wire, under the cap
    err = _refused(f"http://img.test:{server.port}/gzip-bomb", _allowed(), resolver=Resolver())
    assert err.code == "url_too_large"


def test_gzip_within_the_cap_is_inflated(server: LocalServer):
    got = fetch_url(f"http://img.test:{server.port}/gzip-small", _allowed(), resolver=Resolver())
    assert got.data == PNG_BYTES


def test_unknown_content_encoding_is_refused(server: LocalServer):
    err = _refused(f"http://img.test:{server.port}/brotli", _allowed(), resolver=Resolver())
    assert err.code == "url_encoding_unsupported"


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (403, False), (503, True), (429, True)])
def test_http_status(status: int, retryable: bool, server: LocalServer):
    err = _refused(f"http://img.test:{server.port}/status/{status}", _allowed(), resolver=Resolver())
    assert (err.code, err.retryable) == ("url_http_status", retryable)
    assert str(status) in str(err)


# --- the address policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::5db8:d70e",
        "2002:7f00:1::1",
        "2002:5db8:d70e::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "::127.0.0.1",
    ],
)
def test_policy_refuses(address: str):
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111", f"::ffff:{PUBLIC_IP}", "64:ff9b::5db8:d70e"]
)
def test_policy_permits_public_addresses(address: str):
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is None


def test_allow_networks_permit_internal_sources():
    policy = AddressPolicy.from_settings(FetchSettings(allow_networks=["10.0.0.0/8", "fd00::/8"]))
    for address in ("10.1.2.3", "::ffff:10.1.2.3", "fd00::5"):
        assert policy.refusal(ipaddress.ip_address(address)) is None
    assert policy.refusal(ipaddress.ip_address("192.168.0.1")) is not None


# --- TLS: connect to the checked IP, verify the certificate for the hostname --------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=img.test",
         "-addext", "subjectAltName=DNS:img.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
def tls_server(server: LocalServer, certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> LocalServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    monkeypatch.setattr(fetch, "TLS_VERIFY", certificate[0])
    return server


def test_https_is_pinned_and_verified_for_the_hostname(tls_server: LocalServer, connects: list):
    got = fetch_url(f"https://img.test:{tls_server.port}/host", _allowed(), resolver=Resolver())
    assert got.data == f"img.test:{tls_server.port}".encode()
    assert connects == [("127.0.0.1", tls_server.port)]


def test_https_certificate_for_another_name_is_refused(tls_server: LocalServer):
    err = _refused(f"https://other.test:{tls_server.port}/host", _allowed(), Resolver())
    assert (err.code, err.retryable) == ("url_tls_failed", False)
