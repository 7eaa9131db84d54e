"""HTTP/1.1 framing for the control socket: read one capped request, write one response.

A deliberately small subset: origin-form targets, ``Content-Length`` and ``chunked`` bodies
(what ``curl -T -`` sends), keep-alive, ``Expect: 100-continue``. Every read runs against a deadline so that a
client trickling bytes cannot hold a connection longer than the request timeout, and the head
is capped in bytes so that a huge header line cannot grow memory.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

from phicapd.control import protocol as p

_RECV_CHUNK = 65536
_MAX_HEADERS = 100
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(r"([A-Z]{1,20}) (\S{1,8192}) HTTP/(\d)\.(\d)")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LINGER_SECONDS = 1.0
_MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions, or one trailer field
_MAX_TRAILER_BYTES = 16384
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(;.*)?")


class HttpError(Exception):
    """A request that gets an error reply; ``close`` says the connection cannot be reused,
    ``retryable`` goes into the error body (trying again later may succeed)."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = True, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.close = close
        self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self)


class RequestTimeout(HttpError):
    def __init__(self) -> None:
        super().__init__(408, p.REQUEST_TIMEOUT, "the request did not arrive in time", retryable=True)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    version: tuple[int, int]
    headers: dict[str, str]
    content_length: int  # for a chunked body: 0 until it is read, then its length
    keep_alive: bool
    body: bytes = field(default=b"", repr=False)
    chunked: bool = False

    @property
    def expects_continue(self) -> bool:
        return self.version >= (1, 1) and self.headers.get("expect", "").lower() == "100-continue"


class Connection:
    """A client socket with a read buffer; every read takes an absolute ``deadline``."""

    def __init__(self, sock: socket.socket, *, max_header_bytes: int) -> None:
        self.sock = sock
        self.max_header_bytes = max_header_bytes
        self._buf = bytearray()

    @property
    def has_pending(self) -> bool:
        """Bytes of a request that is not complete yet (False between requests)."""
        return bool(self._buf)

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout()
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(_RECV_CHUNK)
        except TimeoutError:
            raise RequestTimeout() from None

    def read_request(self, deadline: float) -> Request | None:
        """The next request's head, or ``None`` when the client closed between requests."""
        while True:
            # Tolerate the stray CRLF some clients send after a body (RFC 9112 §2.2).
            while self._buf[:2] == b"\r\n":
                del self._buf[:2]
            match = _HEAD_END.search(self._buf, 0, self.max_header_bytes + 4)
            if match:
                head = bytes(self._buf[: match.start()])
                del self._buf[: match.end()]
                return parse_head(head)
            if len(self._buf) > self.max_header_bytes:
                raise HttpError(431, p.HEADERS_TOO_LARGE, f"request head exceeds {self.max_header_bytes} bytes")
            chunk = self._recv(deadline)
            if not chunk:
                if self._buf:
                    raise HttpError(400, p.BAD_REQUEST, "connection closed in the middle of a request head")
                return None
            self._buf += chunk

    def read_body(self, length: int, deadline: float) -> bytes:
        """Exactly ``length`` bytes of body; bytes after it stay unread for the next request.

        The body is received straight into one buffer of its size and copied once into the
        ``bytes`` returned, so it is held twice only for the moment of that copy.
        """
        if length <= 0:
            return b""
        buffered = min(len(self._buf), length)
        if buffered == length:  # a small body that came with the head
            with memoryview(self._buf) as view:
                body = bytes(view[:length])
            del self._buf[:length]
            return body
        into = bytearray(length)
        with memoryview(into) as view:
            view[:buffered] = self._buf  # what came with the head: at most one receive
            self._buf.clear()
            got = buffered
            while got < length:
                n = self._recv_into(view[got:], deadline)
                if not n:
                    raise HttpError(400, p.BAD_REQUEST, "connection closed in the middle of a request body")
                got += n
        return bytes(into)

    def read_chunked(self, limit: int, deadline: float) -> bytes:
        """A ``Transfer-Encoding: chunked`` body of at most ``limit`` bytes (RFC 9112 §7.1);
        chunk extensions are ignored, trailer fields read and dropped."""
        body = bytearray()
        while True:
            line = self._read_line(deadline, "chunk size")
            match = _CHUNK_SIZE.fullmatch(line)
            if not match:
                raise HttpError(400, p.BAD_REQUEST, f"malformed chunk size line {line[:40]!r}")
            size = int(match.group(1), 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise HttpError(413, p.PAYLOAD_TOO_LARGE, f"chunked body exceeds the limit of {limit} bytes")
            body += self.read_body(size, deadline)
            if self._read_line(deadline, "chunk end"):
                raise HttpError(400, p.BAD_REQUEST, "chunk data longer than its size")
        trailers = 0
        while line := self._read_line(deadline, "trailer"):
            trailers += len(line)
            if trailers > _MAX_TRAILER_BYTES:
                raise HttpError(431, p.HEADERS_TOO_LARGE, f"trailer fields exceed {_MAX_TRAILER_BYTES} bytes")
        return bytes(body)

    def _read_line(self, deadline: float, what: str) -> bytes:
        """One CRLF- (or LF-) terminated line of at most ``_MAX_CHUNK_LINE`` bytes, without it."""
        while True:
            end = self._buf.find(b"\n", 0, _MAX_CHUNK_LINE + 2)
            if end >= 0:
                line = bytes(self._buf[:end]).rstrip(b"\r")
                del self._buf[: end + 1]
                return line
            if len(self._buf) > _MAX_CHUNK_LINE:
                raise HttpError(400, p.BAD_REQUEST, f"{what} line longer than {_MAX_CHUNK_LINE} bytes")
            chunk = self._recv(deadline)
            if not chunk:
                raise HttpError(400, p.BAD_REQUEST, "connection closed in the middle of a chunked body")
            self._buf += chunk

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout()
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            raise RequestTimeout() from None

    def send(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def linger_close(self) -> None:
        """Close after an early reply, draining briefly what the client still sends.

        Closing a socket with unread input resets the peer, which can make a client that is
        still writing its body miss the error reply we just sent (the classic lingering close).
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                if not self.sock.recv(_RECV_CHUNK):
                    break
        except OSError:
            pass
        finally:
            self.sock.close()


def parse_head(head: bytes) -> Request:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, p.BAD_REQUEST, "request head is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if not match:
        raise HttpError(400, p.BAD_REQUEST, "malformed request line")
    method, target, major, minor = match.groups()
    version = (int(major), int(minor))
    if version not in ((1, 0), (1, 1)):
        raise HttpError(505, p.VERSION_NOT_SUPPORTED, "only HTTP/1.0 and HTTP/1.1 are supported")
    headers = _parse_headers(lines[1:])
    chunked = _is_chunked(headers)
    path, query = _parse_target(target)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == (1, 1) else "keep-alive" in connection
    return Request(
        method=method,
        path=path,
        query=query,
        version=version,
        headers=headers,
        content_length=0 if chunked else _content_length(headers),
        keep_alive=keep_alive,
        chunked=chunked,
    )


def _is_chunked(headers: dict[str, str]) -> bool:
    coding = headers.get("transfer-encoding")
    if coding is None:
        return False
    if "content-length" in headers:
        # Both framings at once is how requests are smuggled past proxies (RFC 9112 §6.3).
        raise HttpError(400, p.BAD_REQUEST, "both Transfer-Encoding and Content-Length")
    if coding.strip().lower() != "chunked":
        raise HttpError(501, p.NOT_IMPLEMENTED, f"transfer coding {coding[:40]!r} is not supported; use chunked")
    return True


def _parse_headers(lines: list[str]) -> dict[str, str]:
    if len(lines) > _MAX_HEADERS:
        raise HttpError(431, p.HEADERS_TOO_LARGE, f"more than {_MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, p.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise HttpError(400, p.BAD_REQUEST, "conflicting Content-Length headers")
            value = f"{headers[name]}, {value}" if name != "content-length" else value
        headers[name] = value
    return headers


def _parse_target(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    path = parts.path
    if not path.startswith("/"):
        raise HttpError(400, p.BAD_REQUEST, "request target must be an absolute path")
    try:
        pairs = parse_qsl(
            # A name that is not UTF-8 arrives as its bytes, percent-encoded (``protocol.dump_json``).
            parts.query,
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=32,
            errors="surrogateescape",
        )
    except ValueError:
        raise HttpError(400, p.BAD_REQUEST, "too many query parameters") from None
    return path, dict(pairs)


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, p.BAD_REQUEST, f"invalid Content-Length {raw[:40]!r}")
    return int(raw)


def render_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    keep_alive: bool,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Server: phicapd",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
