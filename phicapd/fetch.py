"""Safe URL fetching: download one image over http(s) without letting the URL reach inside.

The rules, each enforced on every hop of a redirect chain:

- ``http``/``https`` only, no credentials in the URL, no control characters or backslashes.
- The host is resolved once (numeric IPv4 spellings such as ``2130706433``, ``0x7f000001`` or
  ``0177.1`` are normalised without DNS), every address is checked (``fetch_addresses``:
  the address policy lives there), and the connection is made
  to a checked address: the pool connects to the IP while the Host header, TLS SNI and
  certificate verification use the hostname, so DNS rebinding between check and connect is
  impossible. Refused: loopback, private, link-local, CGNAT (100.64/10), multicast, reserved,
  unspecified and other non-global ranges; IPv4-mapped and NAT64 (64:ff9b::/96) addresses are
  judged by the IPv4 address inside; 6to4, Teredo, IPv4-compatible and local-use NAT64
  addresses are refused. ``FetchSettings.allow_networks`` (CIDRs) explicitly permits internal
  sources.
- Redirects are followed by hand, at most ``max_redirects``, each target re-checked.
- Connect and read timeouts per operation plus a total deadline that a watchdog enforces by
  shutting the socket down, so a server dribbling one byte per second is cut at the deadline.
- A byte cap: a ``Content-Length`` over it is refused before reading; otherwise the stream is
  cut when it passes the cap. ``Accept-Encoding: identity`` is requested; a gzip/deflate body
  sent anyway is inflated incrementally and cut at the same cap (no gzip bomb).
- ``Content-Type`` is returned as advice only; the decoder sniffs the bytes.
- No ``requests.Session`` is used, so environment proxies and ``.netrc`` are never consulted;
  ``FetchSettings.proxy`` is the only proxy, and it is given the checked IP as the target.

Error codes (``FetchError.code``), every message naming the URL:

========================== ==================================================== =========
code                       meaning                                              retryable
========================== ==================================================== =========
``url_invalid``            not a well-formed URL (or a host that cannot be)     no
``url_scheme``             a scheme other than http/https                       no
``url_credentials``        user or password in the URL                          no
``url_address_refused``    the host is, or resolves to, a refused address       no
``url_dns_failed``         the host name did not resolve                        yes
``url_connect_failed``     no checked address accepted a connection             yes
``url_proxy_failed``       the configured proxy failed                          yes
``url_tls_failed``         TLS handshake or certificate verification failed     no
``url_timeout``            a connect/read timeout or the total deadline         yes
``url_too_many_redirects`` more than ``max_redirects`` redirects                no
``url_http_status``        a non-2xx final status (5xx, 408, 425, 429 retry)    depends
``url_too_large``          the body is larger than ``max_bytes``                no
``url_encoding_unsupported`` a Content-Encoding other than gzip/deflate         no
``url_read_failed``        the connection broke while reading                   yes
========================== ==================================================== =========
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

from phicapd.config import FetchSettings
from phicapd.errors import FetchError
from phicapd.fetch_addresses import AddressPolicy, IPAddress, parse_legacy_ipv4

__all__ = ["TLS_VERIFY", "AddressPolicy", "Fetched", "Resolver", "fetch_url", "system_resolver"]

Resolver = Callable[[str, int], Sequence[str]]

# What requests verifies server certificates against (True: its CA bundle). Tests point it at
# their own certificate.
TLS_VERIFY: bool | str = True

_MAX_URL_LENGTH = 8192
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_FORBIDDEN_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True)
class Fetched:
    """A downloaded body: ``url`` is the final URL after redirects."""

    data: bytes
    url: str
    content_type: str | None


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


def _fail(url: str, code: str, detail: str, *, retryable: bool = False) -> FetchError:
    return FetchError(f"{_shown(url)}: {detail}", code=code, retryable=retryable)


_PLAIN_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (ConnectionAbortedError, "connection aborted"),
    (TimeoutError, "timed out"),
)


def _plain_reason(error: BaseException) -> str:
    """The root cause of a requests/urllib3 error in a few words ("connection refused").

    Their own messages nest pool and connection reprs ("_HTTPPool(host=...): Max retries exceeded
    ... Caused by NewConnectionError(...)"), which mean nothing to the user who sent a URL."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        reason = getattr(cause, "reason", None)
        wrapped = next((a for a in cause.args if isinstance(a, BaseException)), None)
        cause = reason if isinstance(reason, BaseException) else cause.__cause__ or wrapped or cause.__context__
    for e in reversed(chain):
        if isinstance(e, OSError) and isinstance(e.strerror, str) and e.strerror:
            return e.strerror[0].lower() + e.strerror[1:]
        phrase = next((text for kind, text in _PLAIN_REASONS if isinstance(e, kind)), None)
        if phrase is not None:
            return phrase
    root = chain[-1]
    return str(root) if type(root).__module__.split(".")[0] not in ("urllib3", "requests") else type(root).__name__


# --- URLs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: str  # normalised by requests (IDNA, percent-encoding)
    scheme: str
    host: str  # for DNS, SNI and certificate checks
    port: int
    literal: IPAddress | None
    host_header: str
    path_url: str


def _host_header(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"


def _literal_address(host: str, url: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise _fail(url, "url_invalid", "scoped IPv6 addresses are not allowed")
        return ip
    try:
        return parse_legacy_ipv4(host)
    except ValueError as e:
        raise _fail(url, "url_invalid", f"numeric host {host!r} is not an IPv4 address ({e})") from None


def _parse_target(url: str) -> _Target:
    if len(url) > _MAX_URL_LENGTH:
        raise _fail(url, "url_invalid", f"longer than {_MAX_URL_LENGTH} characters")
    if _FORBIDDEN_URL_CHARS.search(url):
        raise _fail(url, "url_invalid", "contains whitespace, control characters or backslashes")
    raw = urlsplit(url)
    scheme = raw.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _fail(url, "url_scheme", f"scheme {raw.scheme or '(none)'!r} is not http or https")
    if "@" in raw.netloc:
        shown = raw._replace(netloc=raw.netloc.rpartition("@")[2]).geturl()
        raise _fail(shown, "url_credentials", "credentials in URLs are not allowed")
    try:
        prepared = requests.Request("GET", url).prepare()
        parts = urlsplit(prepared.url or "")
        port = parts.port or _DEFAULT_PORTS[scheme]
    except (requests.RequestException, ValueError) as e:
        raise _fail(url, "url_invalid", str(e)) from None
    host = parts.hostname
    if not host:
        raise _fail(url, "url_invalid", "no host")
    literal = _literal_address(host, url)
    if literal is not None:
        host = str(literal)
    return _Target(
        url=prepared.url or url,
        scheme=scheme,
        host=host,
        port=port,
        literal=literal,
        host_header=_host_header(host, port, scheme),
        path_url=prepared.path_url,
    )


def system_resolver(host: str, port: int) -> list[str]:
    """The default resolver: every address ``getaddrinfo`` gives for a TCP connection."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def _checked_addresses(target: _Target, policy: AddressPolicy, resolver: Resolver) -> list[IPAddress]:
    """Resolve ``target`` once and return its addresses; refuse the host if any is refused."""
    if target.literal is not None:
        addresses = [target.literal]
    else:
        try:
            names = resolver(target.host, target.port)
            addresses = list(dict.fromkeys(ipaddress.ip_address(n) for n in names))
        except (OSError, UnicodeError) as e:
            raise _fail(target.url, "url_dns_failed", f"cannot resolve {target.host} ({e})", retryable=True) from None
        except ValueError as e:
            raise _fail(target.url, "url_dns_failed", f"resolver gave a non-address ({e})") from None
        if not addresses:
            raise _fail(target.url, "url_dns_failed", f"{target.host} has no addresses", retryable=True)
    for ip in addresses:
        reason = policy.refusal(ip)
        if reason is not None:
            host = target.host if target.host == str(ip) else f"{target.host} is {ip}"
            raise _fail(target.url, "url_address_refused", f"{host}: {reason}, refused; {_ALLOW_HINT}")
    return addresses


_ALLOW_HINT = "[fetch] allow_networks lists the networks to allow besides the public internet"


# --- deadline -----------------------------------------------------------------------------------


class _Deadline:
    """The total time budget of one fetch; when it passes, every registered socket is shut down.

    ``shutdown`` wakes a thread blocked in ``recv`` (a timeout per read cannot stop a server that
    sends one byte just before each read timeout).
    """

    def __init__(self, seconds: float) -> None:
        self._expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._expires

    def remaining(self) -> float:
        return max(0.0, self._expires - time.monotonic())

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if not self._expired:
                return
        self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


_CURRENT_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "phicapd_fetch_deadline", default=None
)


class _DeadlineConnectionMixin:
    """Registers each new socket with the current fetch's deadline."""

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        deadline = _CURRENT_DEADLINE.get()
        if deadline is not None:
            deadline.register(sock)
        return sock


class _HTTPConnection(_DeadlineConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES = {"http": _HTTPPool, "https": _HTTPSPool}


# --- one request to one pinned address ------------------------------------------------------------


class _PinnedAdapter(HTTPAdapter):
    """A requests adapter that sends through one pool already pointed at the checked address."""

    def __init__(self, pool: HTTPConnectionPool, request_target: str | None) -> None:
        super().__init__(max_retries=0)
        self._pool = pool
        self._request_target = request_target

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None):
        return self._pool

    def request_url(self, request: Any, proxies: Any) -> str:
        return self._request_target or request.path_url

    def close(self) -> None:
        super().close()
        self._pool.close()


def _pinned_pool(target: _Target, ip: IPAddress, proxy: str | None) -> tuple[HTTPConnectionPool, str | None]:
    """A pool connecting to ``ip`` that speaks TLS for ``target.host``; the request target."""
    tls: dict[str, Any] = {"server_hostname": target.host} if target.scheme == "https" else {}
    if proxy is None:
        return _POOL_CLASSES[target.scheme](str(ip), target.port, maxsize=1, **tls), None
    proxy_url = urllib3.util.parse_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=proxy_url.auth) if proxy_url.auth else None
    manager = urllib3.ProxyManager(proxy, num_pools=1, proxy_headers=headers)
    manager.pool_classes_by_scheme = _POOL_CLASSES
    pool = manager.connection_from_host(str(ip), target.port, target.scheme, pool_kwargs=tls)
    if target.scheme == "https":
        return pool, None  # CONNECT ip:port, then TLS for the hostname
    return pool, f"http://{_host_header(str(ip), target.port, 'http')}{target.path_url}"


def _prepared(target: _Target, settings: FetchSettings, proxied_http: bool) -> requests.PreparedRequest:
    headers = {
        "Host": target.host_header,
        "User-Agent": settings.user_agent,
        "Accept": "image/*, */*;q=0.5",
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    proxy_auth = urllib3.util.parse_url(settings.proxy).auth if settings.proxy else None
    if proxied_http and proxy_auth:
        headers["Proxy-Authorization"] = urllib3.make_headers(proxy_basic_auth=proxy_auth)["proxy-authorization"]
    return requests.Request("GET", target.url, headers=headers).prepare()


def _is_connect_failure(e: requests.RequestException) -> bool:
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)


def _request_error(e: requests.RequestException, target: _Target, deadline: _Deadline) -> FetchError:
    url = target.url
    if deadline.expired:
        return _fail(url, "url_timeout", "the total deadline passed", retryable=True)
    reason = _plain_reason(e)
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return _fail(url, "url_timeout", f"{target.host}: connecting timed out", retryable=True)
    if isinstance(e, requests.exceptions.ReadTimeout):
        return _fail(url, "url_timeout", f"{target.host}: no answer in time", retryable=True)
    if isinstance(e, requests.exceptions.ProxyError):
        return _fail(url, "url_proxy_failed", f"the proxy failed: {reason}", retryable=True)
    if isinstance(e, requests.exceptions.SSLError):
        return _fail(url, "url_tls_failed", f"{target.host}: TLS failed: {reason}")
    if _is_connect_failure(e):
        return _fail(url, "url_connect_failed", f"{target.host}: {reason}", retryable=True)
    return _fail(url, "url_read_failed", f"{target.host}: {reason}", retryable=True)


def _send(
    target: _Target, addresses: list[IPAddress], settings: FetchSettings, deadline: _Deadline
) -> requests.Response:
    """Send the request to the first checked address that accepts a connection."""
    last_error: FetchError | None = None
    for ip in addresses:
        if deadline.expired:
            break
        pool, request_target = _pinned_pool(target, ip, settings.proxy)
        adapter = _PinnedAdapter(pool, request_target)
        timeout = (
            min(settings.connect_timeout_seconds, deadline.remaining()),
            min(settings.read_timeout_seconds, deadline.remaining()),
        )
        request = _prepared(target, settings, proxied_http=request_target is not None)
        try:
            response = adapter.send(request, stream=True, timeout=timeout, verify=TLS_VERIFY)
        except requests.RequestException as e:
            adapter.close()
            last_error = _request_error(e, target, deadline)
            if _is_connect_failure(e) and not deadline.expired:
                continue
            raise last_error from None
        return response  # response.connection is the adapter; the caller closes both
    raise last_error or _fail(target.url, "url_timeout", "the total deadline passed", retryable=True)


# --- the body -------------------------------------------------------------------------------------


def _inflater(encoding: str | None, url: str) -> Callable[[bytes, int], bytes] | None:
    """A bounded decoder for a Content-Encoding the server sent despite ``identity``."""
    names = [n.strip().lower() for n in (encoding or "").split(",") if n.strip()]
    names = [n for n in names if n != "identity"]
    if not names:
        return None
    if len(names) > 1 or names[0] not in ("gzip", "x-gzip", "deflate"):
        raise _fail(url, "url_encoding_unsupported", f"Content-Encoding {encoding!r} is not supported")
    # 32 + MAX_WBITS accepts both zlib and gzip headers (servers mislabel "deflate").
    decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)

    def inflate(chunk: bytes, room: int) -> bytes:
        # Asking for one byte more than fits bounds the output and signals "too large".
        try:
            return decoder.decompress(chunk, room + 1)
        except zlib.error as e:
            raise _fail(url, "url_read_failed", f"bad {names[0]} data ({e})") from None

    return inflate


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _raw_chunks(response: requests.Response) -> Iterator[bytes]:
    return response.raw.stream(_CHUNK_BYTES, decode_content=False)


def _read_body(response: requests.Response, target: _Target, max_bytes: int, deadline: _Deadline) -> bytes:
    url = target.url
    declared = _content_length(response)
    if declared is not None and declared > max_bytes:
        raise _fail(url, "url_too_large", f"Content-Length {declared} exceeds the limit of {max_bytes} bytes")
    inflate = _inflater(response.headers.get("Content-Encoding"), url)
    body = bytearray()
    received = 0
    try:
        for chunk in _raw_chunks(response):
            received += len(chunk)
            piece = inflate(chunk, max_bytes - len(body)) if inflate else chunk
            if received > max_bytes or len(body) + len(piece) > max_bytes:
                raise _fail(url, "url_too_large", f"the body exceeds the limit of {max_bytes} bytes")
            body += piece
    except (urllib3.exceptions.HTTPError, OSError) as e:
        if deadline.expired:
            raise _fail(url, "url_timeout", "the total deadline passed while reading", retryable=True) from None
        if isinstance(e, ReadTimeoutError):
            raise _fail(url, "url_timeout", "reading the body timed out", retryable=True) from None
        detail = f"the connection broke: {_plain_reason(e)}"
        raise _fail(url, "url_read_failed", detail, retryable=True) from None
    if deadline.expired:  # the watchdog's shutdown looks like a clean end of a close-delimited body
        raise _fail(url, "url_timeout", "the total deadline passed while reading", retryable=True)
    return bytes(body)


# --- redirects and the public entry point ---------------------------------------------------------


def _redirect_location(response: requests.Response) -> str | None:
    if response.status_code not in _REDIRECT_STATUSES:
        return None
    location = response.headers.get("Location")
    if not location:
        return None
    try:  # http.client decodes headers as latin-1; servers send UTF-8
        return location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return location


def _check_status(response: requests.Response, target: _Target) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    retryable = status >= 500 or status in _RETRYABLE_STATUSES
    raise _fail(target.url, "url_http_status", f"HTTP {status} {response.reason or ''}".rstrip(), retryable=retryable)


def _follow(url: str, settings: FetchSettings, resolver: Resolver, deadline: _Deadline) -> Fetched:
    policy = AddressPolicy.from_settings(settings)
    current = url
    for _ in range(settings.max_redirects + 1):
        target = _parse_target(current)
        addresses = _checked_addresses(target, policy, resolver)
        if deadline.expired:
            raise _fail(target.url, "url_timeout", "the total deadline passed", retryable=True)
        response = _send(target, addresses, settings, deadline)
        try:
            location = _redirect_location(response)
            if location is None:
                _check_status(response, target)
                data = _read_body(response, target, settings.max_bytes, deadline)
                return Fetched(data=data, url=target.url, content_type=response.headers.get("Content-Type"))
        finally:
            response.close()
            response.connection.close()
        current = urljoin(target.url, location)
    raise _fail(url, "url_too_many_redirects", f"more than {settings.max_redirects} redirects")


def fetch_url(url: str, settings: FetchSettings, *, resolver: Resolver | None = None) -> Fetched:
    """Download ``url`` under the rules in the module docstring.

    ``resolver(host, port)`` returns the host's addresses as strings (default: ``getaddrinfo``);
    it is called once per hop and the connection goes to an address it returned. Raises
    ``FetchError`` (codes in the module docstring), or ``ConfigError`` for a bad
    ``allow_networks`` entry.
    """
    deadline = _Deadline(settings.total_timeout_seconds)
    token = _CURRENT_DEADLINE.set(deadline)
    try:
        return _follow(url, settings, resolver or system_resolver, deadline)
    finally:
        _CURRENT_DEADLINE.reset(token)
        deadline.cancel()
