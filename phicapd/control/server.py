"""The control server: HTTP/1.1 over a Unix socket, a bounded thread per connection.

One accept thread admits connections up to ``max_connections`` and starts a thread for each;
caption requests block that thread in the backend while the GPU works. Each request's head must
arrive within ``head_timeout_seconds`` and the whole request within ``request_timeout_seconds``;
the reply is not bounded by that, the caption has its own timeout. Every request is logged with
the peer's pid/uid/gid from SO_PEERCRED.

Slow or idle connections cannot starve real clients: at ``max_connections``, a new connection
takes the slot of the one that has waited longest for a request head, if that is over
``CUT_AFTER_SECONDS`` (a client sending nothing or trickling its head, or idle between
requests: a kept-alive client reconnects), which is cut. A real client sends its head at once,
so it is not cut while the server has yet to read it.
Only when every slot holds a request in progress does a new connection get an immediate 503
``busy`` and is closed.

Request bodies are capped daemon-wide as well as per request: ``max_connections`` uploads of
``max_body_bytes`` each would be gigabytes. A body's ``Content-Length`` is reserved from a
``BodyBudget`` before the body is read and given back once the reply is sent or the request
failed; a request that does not fit gets an immediate 503 ``busy`` (retryable) and its
connection is closed, its body unread.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from phicapd.config import ControlSettings
from phicapd.control import protocol as p
from phicapd.control.backend import ControlBackend
from phicapd.control.http_framing import CONTINUE, Connection, HttpError, Request, render_response
from phicapd.control.listener import (
    BoundSocket,
    PeerCred,
    bind_unix_socket,
    peer_credentials,
    unlink_if_ours,
)
from phicapd.control.routes import Response, Router, error_response
from phicapd.metrics import REQUEST_BUCKETS, render

log = structlog.get_logger(__name__)

_UNKNOWN_PEER = PeerCred(-1, -1, -1)
_BUSY_SEND_TIMEOUT = 0.2
_ACCEPT_BACKOFF = 0.1
#: A connection waiting this long for a request head may be cut to admit a new one.
CUT_AFTER_SECONDS = 0.5
# Request-body bytes the server holds at once, all connections together (raised to
# ``max_body_bytes`` when that is larger, so that one upload of the largest size always fits).
MAX_BODY_BYTES_HELD = 512 * 1024 * 1024


class BodyBudget:
    """Bytes of request bodies reserved at once, daemon-wide; thread-safe.

    A reservation of 0 bytes always succeeds, so requests without a body are never refused.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"body budget must be positive, not {limit}")
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (and nothing reserved) when they do not fit."""
        if nbytes <= 0:
            return True
        with self._lock:
            if self._held + nbytes > self.limit:
                return False
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            if nbytes > self._held:
                raise RuntimeError(f"releasing {nbytes} body bytes, only {self._held} reserved")
            self._held -= nbytes


class ControlServer:
    """Serve ``backend`` on the control socket.

    ``listen_socket`` is a socket systemd passed by socket activation; otherwise the server
    binds ``settings.socket`` itself (mode 0660, group ``settings.socket_group``) and removes it
    again on ``stop()``. An inherited socket is never unlinked: its unit owns it.
    """

    def __init__(
        self,
        settings: ControlSettings,
        backend: ControlBackend,
        *,
        listen_socket: socket.socket | None = None,
        body_budget_bytes: int | None = None,
    ) -> None:
        """``body_budget_bytes``: the daemon-wide cap on request-body bytes held at once
        (default ``MAX_BODY_BYTES_HELD``, but at least ``settings.max_body_bytes``)."""
        self.settings = settings
        self.backend = backend
        self._inherited = listen_socket
        self._listen: socket.socket | None = None
        self._bound: BoundSocket | None = None
        self._router = Router(backend, settings, extra_metrics=self._metrics_text)
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        # Connections waiting for a request head, since when: the ones a new connection may cut.
        self._heads: dict[socket.socket, float] = {}
        self._evicted: set[socket.socket] = set()  # cut for a new connection, their thread not done yet
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._path: Path | None = None
        self._statuses: Counter[int] = Counter()
        self._rejected = 0
        self._cut = 0
        self._rejected_bodies = 0
        limit = body_budget_bytes or max(MAX_BODY_BYTES_HELD, settings.max_body_bytes)
        self.body_budget = BodyBudget(limit)
        # The server's own registry (not the global one): several servers may share a process.
        self._registry = CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "phicapd_control_request_seconds",
            "Seconds from a request's head to its reply, by endpoint (caption requests include the caption).",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=self._registry,
        )
        self._registry.register(_ServerCollector(self))

    def serve(self, backend: ControlBackend) -> None:
        """Answer with ``backend`` from the next request on (the daemon's stand-in for while the
        model loads gives way to its whole API). A request already in a backend's call ends there."""
        self.backend = backend
        self._router.backend = backend

    @property
    def socket_path(self) -> Path | None:
        """Where clients connect: the bound path, or the name of the socket systemd passed."""
        return self._path

    def start(self) -> None:
        if self._listen is not None:
            raise RuntimeError("control server already started")
        if self._inherited is not None:
            self._listen = self._inherited
            name = self._listen.getsockname()
            self._path = Path(name) if isinstance(name, str) and name else None
        else:
            self._bound = bind_unix_socket(
                self.settings.socket,
                group=self.settings.socket_group,
                backlog=min(4096, max(128, self.settings.max_connections)),
            )
            self._listen = self._bound.sock
            self._path = self._bound.path
        self._listen.setblocking(False)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="phicapd-control", daemon=True)
        self._accept_thread.start()
        log.info(
            "control socket listening",
            path=str(self.socket_path),
            activated=self._inherited is not None,
            max_connections=self.settings.max_connections,
            body_budget_bytes=self.body_budget.limit,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut open connections and wait (up to ``timeout``) for their threads."""
        if self._stopping.is_set():
            return
        if self._listen is None:  # never started
            self._wake_r.close()
            self._wake_w.close()
            return
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        self._listen.close()
        if self._bound is not None:
            unlink_if_ours(self._bound)
        self._wake_r.close()
        self._wake_w.close()
        log.info("control socket closed", path=str(self.socket_path))

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accepting ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listen is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listen, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept_one()

    def _accept_one(self) -> None:
        assert self._listen is not None
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # Out of descriptors: back off instead of spinning; the backlog keeps the clients.
            log.error("control accept failed", error=str(e))
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(_ACCEPT_BACKOFF)
            return
        conn.setblocking(True)
        thread = threading.Thread(target=self._serve, args=(conn,), name="phicapd-control-conn", daemon=True)
        with self._lock:
            open_now = len(self._conns) - len(self._evicted)
            victim = None
            if open_now >= self.settings.max_connections and self._heads:
                oldest = min(self._heads, key=self._heads.__getitem__)
                if time.monotonic() - self._heads[oldest] >= CUT_AFTER_SECONDS:
                    victim = oldest
                    self._evict(victim)
                    open_now -= 1
            admitted = open_now < self.settings.max_connections
            if admitted:
                self._conns[conn] = thread
                self._heads[conn] = time.monotonic()
            else:
                self._rejected += 1
        if victim is not None:
            peer = _peer(victim)
            log.info("control connection cut", reason="no request head", pid=peer.pid, uid=peer.uid, gid=peer.gid)
        if admitted:
            thread.start()
        else:
            self._reject_busy(conn)

    def _evict(self, conn: socket.socket) -> None:
        """Cut a connection waiting for a head (under ``_lock``): its thread's read ends at once
        and it closes without an answer, as after an idle timeout."""
        del self._heads[conn]
        self._evicted.add(conn)
        self._cut += 1
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def _reject_busy(self, conn: socket.socket) -> None:
        """Answer 503 without a thread: the reply fits the socket buffer, so this cannot block long."""
        peer = _peer(conn)
        resp = error_response(
            503, p.BUSY, f"too many connections (limit {self.settings.max_connections})", retryable=True
        )
        wire = Connection(conn, max_header_bytes=self.settings.max_header_bytes)
        try:
            wire.send(render_response(resp.status, resp.body, keep_alive=False), _BUSY_SEND_TIMEOUT)
        except OSError:
            pass
        finally:
            # No lingering here: the accept thread must not wait on a client.
            conn.close()
        self._count(503)
        log.warning("control connection refused", reason="busy", pid=peer.pid, uid=peer.uid, gid=peer.gid)

    # -- serving one connection --------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        peer = _peer(conn)
        wire = Connection(conn, max_header_bytes=self.settings.max_header_bytes)
        try:
            while not self._stopping.is_set():
                if not self._serve_one(wire, peer):
                    break
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                self._heads.pop(conn, None)
                self._evicted.discard(conn)
            conn.close()

    def _serve_one(self, wire: Connection, peer: PeerCred) -> bool:
        """Read, answer and log one request; return whether the connection stays open."""
        started = time.monotonic()
        deadline = started + self.settings.request_timeout_seconds
        head_deadline = started + min(self.settings.head_timeout_seconds, self.settings.request_timeout_seconds)
        req: Request | None = None
        reserved = 0
        try:
            try:
                req = self._read_head(wire, head_deadline)
                if req is None:
                    return False
                started = time.monotonic()
                reserved = self._admit(req)
                resp = self._exchange(wire, req, deadline)
                close = not req.keep_alive
            except HttpError as e:
                if req is None and e.status == 408 and not wire.has_pending:
                    # An idle connection: close it quietly. A 408 here could be read by the client
                    # as the answer to the request it is just sending on this kept-alive connection.
                    wire.sock.close()
                    return False
                headers = self._router.allow_header(req.path) if req is not None and e.status == 405 else ()
                resp = error_response(e.status, e.code, e.message, retryable=e.retryable, headers=headers)
                # An unread body would be parsed as the next request: such a connection must close.
                close = e.close or req is None or not req.keep_alive or req.content_length > 0
            except OSError:
                return False  # the client went away

            close = close or self._stopping.is_set()
            try:
                data = render_response(
                    resp.status, resp.body, content_type=resp.content_type, keep_alive=not close, headers=resp.headers
                )
                wire.send(data, self.settings.request_timeout_seconds)
            except OSError:
                close = True
        finally:
            # Whatever happened (reply sent, error, timeout, client gone, a bug), the body is
            # dropped and its bytes go back to the budget before anything else can block.
            if req is not None:
                req.body = b""
            self.body_budget.release(reserved)
        self._count(resp.status)
        duration = time.monotonic() - started
        self._latency.labels(endpoint=self._router.endpoint(req.path) if req else "none").observe(duration)
        log.info(
            "control request",
            method=req.method if req else None,
            path=req.path if req else None,
            status=resp.status,
            duration_ms=round(duration * 1000, 1),
            bytes_in=req.content_length if req else None,
            pid=peer.pid,
            uid=peer.uid,
            gid=peer.gid,
        )
        if close:
            wire.linger_close()
        return not close

    def _read_head(self, wire: Connection, deadline: float) -> Request | None:
        """The next request's head; None when the client closed, or the connection was cut for a
        new one meanwhile (``_evict``: then whatever was read of it is dropped)."""
        sock = wire.sock
        with self._lock:
            if sock in self._evicted:
                return None
            self._heads[sock] = time.monotonic()
        try:
            req = wire.read_request(deadline)
        except (HttpError, OSError):
            if self._head_done(sock):
                return None
            raise
        return None if self._head_done(sock) else req

    def _head_done(self, sock: socket.socket) -> bool:
        """The head phase is over; True if the connection was cut meanwhile."""
        with self._lock:
            self._heads.pop(sock, None)
            return sock in self._evicted

    def _admit(self, req: Request) -> int:
        """Refuse an unknown route or a body over its cap, else reserve the body's bytes in the
        daemon-wide budget; return the bytes reserved. Nothing of the body is read here."""
        limit = self._router.body_limit(req)
        if req.content_length > limit:
            raise HttpError(
                413, p.PAYLOAD_TOO_LARGE, f"body of {req.content_length} bytes exceeds the limit of {limit}"
            )
        # A chunked body's size is known only once read: it may take up to the endpoint's limit.
        wanted = limit if req.chunked else req.content_length
        if not self.body_budget.reserve(wanted):
            with self._lock:
                self._rejected_bodies += 1
            raise HttpError(
                503,
                p.BUSY,
                f"too many request bodies in progress (limit {self.body_budget.limit} bytes at once)",
                retryable=True,
            )
        return wanted

    def _exchange(self, wire: Connection, req: Request, deadline: float) -> Response:
        """Read the body (its bytes are reserved by ``_admit``) and answer the request.

        An ``HttpError`` escaping from here means the body was not (fully) read.
        """
        if req.expects_continue and (req.content_length or req.chunked):
            wire.send(CONTINUE, self.settings.request_timeout_seconds)
        if req.chunked:
            req.body = wire.read_chunked(self._router.body_limit(req), deadline)
            req.content_length = len(req.body)
        else:
            req.body = wire.read_body(req.content_length, deadline)
        try:
            return self._router.handle(req)
        except HttpError as e:  # a bad parameter: the body was consumed, the connection is reusable
            return error_response(e.status, e.code, e.message)

    # -- metrics -----------------------------------------------------------------------------

    def _count(self, status: int) -> None:
        with self._lock:
            self._statuses[status] += 1

    def _metrics_text(self) -> str:
        return render(self._registry)


class _ServerCollector(Collector):
    """The server's gauges and totals, read at scrape time (names as before prometheus_client)."""

    def __init__(self, server: ControlServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        srv = self._server
        with srv._lock:
            open_conns = len(srv._conns)
            statuses = sorted(srv._statuses.items())
            rejected = srv._rejected
            cut = srv._cut
            rejected_bodies = srv._rejected_bodies
        yield GaugeMetricFamily("phicapd_control_connections", "Open control-socket connections.", value=open_conns)
        yield CounterMetricFamily(
            "phicapd_control_rejected_connections", "Connections refused at max_connections.", value=rejected
        )
        yield CounterMetricFamily(
            "phicapd_control_cut_connections",
            "Connections waiting for a request head that were cut at max_connections to admit a new one.",
            value=cut,
        )
        yield GaugeMetricFamily(
            "phicapd_control_body_bytes", "Request-body bytes reserved by requests in progress.", srv.body_budget.held
        )
        yield GaugeMetricFamily(
            "phicapd_control_body_bytes_limit",
            "Request-body bytes the server holds at most at once.",
            srv.body_budget.limit,
        )
        yield CounterMetricFamily(
            "phicapd_control_rejected_bodies", "Requests refused (503 busy) for the body budget.", rejected_bodies
        )
        requests = CounterMetricFamily(
            "phicapd_control_requests", "Control requests answered, by HTTP status.", labels=["status"]
        )
        for status, n in statuses:
            requests.add_metric([str(status)], n)
        yield requests


def _peer(conn: socket.socket) -> PeerCred:
    try:
        return peer_credentials(conn)
    except OSError:
        return _UNKNOWN_PEER
