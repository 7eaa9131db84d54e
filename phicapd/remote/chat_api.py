"""OpenAI chat-completions over HTTP, as vLLM serves it: the request, the reply, the failures.

Plain ``http.client`` with one keep-alive connection per thread and endpoint: a fleet of
requests in flight costs a thread each and no per-request connection set-up. Every failure
becomes a ``RemoteFailure`` whose ``kind`` says whose fault it is, which is what the pool and
the journal need: the endpoint's (take it out, send the request elsewhere), the image's (a 400
naming it: that image's own failure) or the request's (retried a few times, then a retryable
error, never a "bad image").

Every request has one deadline, ``timeout`` seconds from the connect to the last byte of the
reply (``[remote] timeout_seconds``). Each socket operation waits at most the time left, and a
watchdog shuts the connection of a request still running at its deadline: a per-read timeout
alone never fires for a server that sends a byte a second. The reply body is read in pieces
under a byte cap (``reply_cap``: what ``max_tokens`` can take), so a huge or endless reply is
refused without being buffered.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from phicapd.caption_text import MAX_CHARS_PER_TOKEN

#: Longest Retry-After honoured; a server asking for more is probed again before then anyway.
MAX_RETRY_AFTER = 300.0
#: A 400 whose message says one of these is about the image (too large, undecodable, too many tokens).
_IMAGE_WORDS = ("image", "multimodal", "multi-modal", "pixel", "too long", "context length", "decode")
#: A reply body is read in pieces of this size, the byte cap and the deadline checked between them.
READ_CHUNK = 64 * 1024
#: The chat reply's JSON around the caption (ids, usage, vLLM's extra fields): the cap's fixed part.
REPLY_OVERHEAD_BYTES = 64 * 1024
#: The most bytes one caption character can take in the reply's JSON (a ``\uXXXX`` escape).
BYTES_PER_CHAR = 6
#: The cap of a reply that carries no caption (``GET /models``, an error).
MAX_SMALL_REPLY = 1024 * 1024


def reply_cap(max_tokens: int) -> int:
    """The most bytes a chat-completions reply to a request for ``max_tokens`` tokens may take:
    every token at ``MAX_CHARS_PER_TOKEN`` characters, each escaped, plus the JSON around them."""
    return REPLY_OVERHEAD_BYTES + max_tokens * MAX_CHARS_PER_TOKEN * BYTES_PER_CHAR


class Kind(StrEnum):
    IMAGE = "image"  # a 400 naming the image: that image's own failure
    REJECTED = "rejected"  # another 4xx: the request as we build it; not the image, not the server
    OVERLOAD = "overload"  # 429 / 503: fewer in flight, Retry-After honoured, sent again
    AUTH = "auth"  # 401 / 403: the API key; the endpoint is out until it takes it
    MODEL = "model"  # 404 naming the model: the endpoint serves another one
    SERVER = "server"  # 5xx, a malformed reply: counted against endpoint and request
    CONNECT = "connect"  # refused, unreachable: the endpoint's, the request goes elsewhere
    # The connection broke before the whole reply, or the reply was not complete at the deadline:
    # once, anyone's (sent again); again on the same image while the endpoint answers other
    # images, the image's (``remote_dropped``, see ``phicapd.remote.captioner``).
    DROPPED = "dropped"
    TIMEOUT = "timeout"
    TLS = "tls"  # the endpoint's certificate is not trusted: out until it is (ca_file, tls_verify)
    # A 400 refusing a request parameter, or saying the server was not started to allow
    # something: the endpoint's configuration, never the image's. ``RemoteFailure.param`` names
    # it when the server does; see ``phicapd.remote.captioner`` for what is done about it.
    UNSUPPORTED = "unsupported"
    # A reply over its byte cap (``reply_cap``): the server ignores ``max_tokens``. The image's
    # ``caption_too_long``; the endpoint answered, so it stays up.
    TOO_LONG = "too_long"


class RemoteFailure(Exception):
    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.param = param  # the request parameter an UNSUPPORTED refusal names, if it names one


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    completion_tokens: int
    model: str
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed endpoint base URL (``http://host:port/v1``)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        assert parts.hostname is not None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url, parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def chat_body(
    *,
    model: str,
    prompt: str,
    image_url: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    num_crops: int | None,
) -> bytes:
    """The JSON of one chat-completions request: one user turn with the text and the image."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "n": 1,
        "stream": False,
    }
    if num_crops is not None:
        # vLLM's extension to the request: passed to the model's HF processor (Phi-3.5-vision's crops).
        body["mm_processor_kwargs"] = {"num_crops": num_crops}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_completion(data: bytes) -> Completion:
    """The first choice of a chat-completions reply; ``RemoteFailure(SERVER)`` if it is not one."""
    try:
        reply = json.loads(data)
        choice = reply["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
        usage = reply.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Completion(
            text,
            int(tokens) if isinstance(tokens, int) else 0,
            str(reply.get("model") or ""),
            choice.get("finish_reason"),
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RemoteFailure(Kind.SERVER, f"malformed chat-completions reply: {type(e).__name__}: {e}") from None


def served_models(data: bytes) -> list[str]:
    """The ids in a ``GET /v1/models`` reply."""
    try:
        return [str(m["id"]) for m in json.loads(data)["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteFailure(Kind.SERVER, f"malformed /models reply: {type(e).__name__}: {e}") from None


def _error_body(data: bytes) -> dict[str, Any]:
    """The error object of an error body: OpenAI's (and vLLM's) ``{"error": {"message", "param",
    ...}}`` or older vLLM's ``{"object": "error", "message": ...}``; ``{}`` if it is neither."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return inner if isinstance(inner.get("message"), str) else {}


def error_message(data: bytes) -> str:
    """The message of an error body (``_error_body``); else the start of the body."""
    message = _error_body(data).get("message")
    if isinstance(message, str):
        return message[:500]
    return data[:200].decode("utf-8", "replace").strip() or "(empty body)"


#: The request's own fields: a 400 naming one of these as its ``param`` refuses that field.
#: (``messages`` is left out: a refused message is about the prompt or the image in it.)
REQUEST_PARAMETERS = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "mm_processor_kwargs")
#: What a server says when it was not started to allow something (vLLM 0.32: "Per-request
#: mm_processor_kwargs are disabled by default ... Start the server with --trust-request-mm-kwargs").
_SERVER_FLAG_WORDS = ("start the server with", "disabled by default", "not enabled on this server")


def refused_parameter(status: int, data: bytes) -> tuple[bool, str | None]:
    """Whether an error reply refuses the request as the server is configured (not the image),
    and the parameter it names, if any."""
    if status != 400:
        return False, None
    body = _error_body(data)
    param = body.get("param")
    named = param if isinstance(param, str) and param in REQUEST_PARAMETERS else None
    message = str(body.get("message", "")).lower()
    return named is not None or any(w in message for w in _SERVER_FLAG_WORDS), named


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (now if now is not None else time.time())
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def classify(status: int, data: bytes, headers: http.client.HTTPMessage | None = None) -> RemoteFailure:
    """The failure an HTTP error status stands for."""
    message = error_message(data)
    text = f"HTTP {status}: {message}"
    if status in (429, 503):
        wait = retry_after(headers.get("Retry-After")) if headers is not None else None
        return RemoteFailure(Kind.OVERLOAD, text, status=status, retry_after=wait)
    if status in (401, 403):
        return RemoteFailure(Kind.AUTH, f"the API key was refused ({text})", status=status)
    if status == 404 and "model" in message.lower():
        return RemoteFailure(Kind.MODEL, text, status=status)
    refused, param = refused_parameter(status, data)
    if refused:  # before the image words: vLLM's refusal speaks of "multimodal preprocessing"
        return RemoteFailure(Kind.UNSUPPORTED, text, status=status, param=param)
    if status in (400, 413, 422) and any(w in message.lower() for w in _IMAGE_WORDS):
        return RemoteFailure(Kind.IMAGE, text, status=status)
    if 400 <= status < 500:
        return RemoteFailure(Kind.REJECTED, text, status=status)
    return RemoteFailure(Kind.SERVER, text, status=status)


class _Watch:
    """One request's deadline, and the connection it runs on (set once there is one)."""

    __slots__ = ("conn", "deadline", "fired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conn: http.client.HTTPConnection | None = None
        self.fired = False


class Watchdog:
    """Shuts the connection of a request still running at its deadline.

    A socket timeout bounds one read, not the request: a server that sends a byte a second
    never trips it, in the headers, the body or a TLS handshake. One thread for every request
    in flight sleeps until the earliest deadline; it ends when nothing is watched.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="phicapd-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def release(self, watch: _Watch) -> bool:
        """Stop watching; True when the deadline passed and the connection was shut."""
        with self._cond:
            self._watches.discard(watch)
            return watch.fired

    def _run(self) -> None:
        with self._cond:
            while self._watches:
                now = time.monotonic()
                for watch in [w for w in self._watches if w.deadline <= now]:
                    self._watches.discard(watch)
                    watch.fired = True
                    sock = watch.conn.sock if watch.conn is not None else None
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                if self._watches:
                    self._cond.wait(min(w.deadline for w in self._watches) - now)
            self._thread = None


class Http:
    """Keep-alive HTTP(S) connections, one per thread and endpoint."""

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "phicapd"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ssl = ssl_context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()  # every thread's, for abort()
        self._watchdog = Watchdog()

    def _connection(self, target: Target, watch: _Watch) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused), connected within ``connect_timeout`` and the time left."""
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(target.url)
        if conn is not None and conn.sock is not None:
            watch.conn = conn
            return conn, True
        timeout = max(0.001, min(self.connect_timeout, watch.deadline - time.monotonic()))
        if target.scheme == "https":
            conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        watch.conn = conn
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise RemoteFailure(Kind.TLS, f"its TLS certificate is not trusted: {e.verify_message}") from None
        except ssl.SSLError as e:
            conn.close()
            raise RemoteFailure(Kind.CONNECT, f"TLS handshake failed: {e}") from None
        except (TimeoutError, OSError) as e:
            conn.close()
            raise RemoteFailure(Kind.CONNECT, f"cannot connect: {_reason(e)}") from None
        conns[target.url] = conn
        with self._lock:
            self._open.add(conn)
        return conn, False

    def _drop(self, target: Target) -> None:
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(target.url, None)
        if conn is not None:
            self._forget(conn)

    def request(
        self,
        target: Target,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        max_body: int = MAX_SMALL_REPLY,
        timeout: float | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body), all within ``timeout`` seconds (default ``self.timeout``) from
        the connect to the last byte. Raises ``RemoteFailure`` when no whole reply came: CONNECT
        or TLS (no connection), DROPPED (it broke), TIMEOUT (the deadline passed) or TOO_LONG
        (a body over ``max_body`` bytes, refused without reading the rest)."""
        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        for attempt in (0, 1):
            watch = self._watchdog.watch(deadline)
            sent = reused = answered = False
            try:
                conn, reused = self._connection(target, watch)
                _time_left(conn, deadline, seconds)
                conn.request(method, target.path + path, body=body, headers=self._headers)
                sent = True
                _time_left(conn, deadline, seconds)
                response = conn.getresponse()
                answered = True
                data = _read_capped(response, conn, deadline, seconds, max_body)
            except RemoteFailure:
                self._watchdog.release(watch)
                self._drop(target)
                raise
            except (http.client.HTTPException, OSError) as e:
                fired = self._watchdog.release(watch)
                self._drop(target)
                if fired or isinstance(e, TimeoutError):
                    raise _timed_out(seconds) from None
                if (
                    reused
                    and attempt == 0
                    and not answered
                    and isinstance(e, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError)
                ):
                    continue  # the server closed an idle keep-alive connection: once more on a fresh one
                what = "connection dropped" if sent else "cannot send"
                raise RemoteFailure(Kind.DROPPED, f"{what}: {_reason(e)}") from None
            if self._watchdog.release(watch):
                self._drop(target)  # shut at the deadline: what was read may be cut short
                raise _timed_out(seconds)
            if response.will_close:
                self._drop(target)
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close this thread's connections."""
        for conn in self._local.__dict__.pop("conns", {}).values():
            self._forget(conn)

    def abort(self) -> None:
        """Shut every thread's connections: a request waiting for its reply fails at once, so that
        the process can exit without waiting out ``timeout``."""
        with self._lock:
            conns = list(self._open)
            self._open.clear()
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _timed_out(seconds: float) -> RemoteFailure:
    return RemoteFailure(Kind.TIMEOUT, f"no complete reply within {seconds:g} s")


def _time_left(conn: http.client.HTTPConnection, deadline: float, seconds: float) -> None:
    """The next socket operation may wait only for what is left of the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(seconds)
    if conn.sock is not None:
        conn.sock.settimeout(left)


def _read_capped(
    response: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float, seconds: float, cap: int
) -> bytes:
    """The body, or ``RemoteFailure(TOO_LONG)`` as soon as it is known to exceed ``cap`` bytes."""
    if response.length is not None and response.length > cap:
        raise RemoteFailure(Kind.TOO_LONG, f"a reply of {response.length} bytes, over the {cap} allowed")
    parts: list[bytes] = []
    size = 0
    while True:
        _time_left(conn, deadline, seconds)
        chunk = response.read(READ_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > cap:
            raise RemoteFailure(Kind.TOO_LONG, f"a reply of more than {cap} bytes")
        parts.append(chunk)


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.gaierror):
        return f"name does not resolve ({e.strerror})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
