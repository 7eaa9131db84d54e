"""A small client for the control socket: stdlib ``http.client`` over AF_UNIX.

One keep-alive connection per thread, so a thread pool of caption requests gets a pool of
connections. Errors come out as three exception types that map onto phicapctl's exit codes:
``DaemonUnreachable`` (no daemon at the socket), ``RequestRejected`` (4xx: the input was
refused) and ``RequestFailed`` (5xx or no answer in time: the caption failed).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from pydantic import ValidationError

from phicapd.control import protocol as p
from phicapd.errors import PhicapError

DEFAULT_TIMEOUT = 30.0
DEFAULT_CAPTION_TIMEOUT = 900.0  # above the daemon's own caption timeout, so it answers first


class ControlClientError(PhicapError):
    status: int | None = None


class DaemonUnreachable(ControlClientError):
    code = "daemon_unreachable"
    retryable = True


class RequestRejected(ControlClientError):
    """The daemon refused the request (4xx)."""


class RequestFailed(ControlClientError):
    """The daemon accepted the request but could not answer it (5xx, or no answer in time)."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` that connects to a Unix socket; the Host header says ``phicapd``."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("phicapd", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _error_from(status: int, body: bytes) -> ControlClientError:
    try:
        detail = p.load_json(p.ErrorReply, body).error
    except ValidationError:
        detail = p.ErrorDetail(code=f"http_{status}", message=body[:200].decode("utf-8", "replace") or str(status))
    cls = RequestRejected if 400 <= status < 500 else RequestFailed
    err = cls(detail.message, code=detail.code, retryable=detail.retryable)
    err.status = status
    return err


class ControlClient:
    def __init__(
        self,
        socket_path: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        caption_timeout: float = DEFAULT_CAPTION_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.caption_timeout = caption_timeout
        self._local = threading.local()
        self._all: list[UnixHTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def _connection(self) -> UnixHTTPConnection:
        conn: UnixHTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = UnixHTTPConnection(self.socket_path, self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _open(self, conn: UnixHTTPConnection) -> None:
        try:
            conn.connect()
        except FileNotFoundError:
            raise DaemonUnreachable(f"no daemon socket at {self.socket_path} (is phicapd running?)") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(f"nothing is listening on {self.socket_path}") from None
        except PermissionError:
            raise DaemonUnreachable(
                f"permission denied on {self.socket_path} (are you in the socket's group?)"
            ) from None
        except OSError as e:
            raise DaemonUnreachable(f"cannot connect to {self.socket_path}: {e}") from None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        query: dict[str, Any] | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> RawResponse:
        """Send one request and return the response; raise for a status >= 400 not in ``accept``."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = path + (f"?{urlencode(params, errors='surrogateescape')}" if params else "")
        headers = {"Content-Type": content_type} if content_type else {}
        conn = self._connection()
        conn.timeout = timeout or self.timeout
        for attempt in (1, 2):
            reused = conn.sock is not None
            if not reused:
                self._open(conn)
            assert conn.sock is not None
            conn.sock.settimeout(conn.timeout)  # http.client applies its timeout only at connect
            try:
                response = self._roundtrip(conn, method, url, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused and attempt == 1:
                    continue  # the daemon closed an idle keep-alive connection: try a fresh one
                raise DaemonUnreachable(f"the daemon closed the connection: {e}") from None
            except TimeoutError:
                conn.close()
                raise RequestFailed(
                    f"no answer from the daemon within {conn.timeout:g} s", code="client_timeout"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise DaemonUnreachable(f"control connection failed: {e}") from None
            if response.status >= 400 and response.status not in accept:
                raise _error_from(response.status, response.body)
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _roundtrip(
        conn: UnixHTTPConnection, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> RawResponse:
        # The daemon may refuse early (413, 503) and close while we are still sending; its
        # answer is then already waiting in our receive buffer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            conn.close()
        return RawResponse(resp.status, resp.getheader("Content-Type", ""), data)

    def _get_json(self, path: str, query: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, query=query).json()

    def _post_json(self, path: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else b""
        return self.request("POST", path, body=body, content_type="application/json", timeout=timeout).json()

    # -- endpoints ---------------------------------------------------------------------------

    def status(self) -> p.StatusReply:
        return p.StatusReply.model_validate(self._get_json("/v1/status"))

    def health(self) -> bool:
        """True when the model is warm; False while it loads (503)."""
        return self.health_reply().ready

    def health_reply(self) -> p.HealthReply:
        """The whole answer: whether a caption can be made now, the state, and why not (503)."""
        resp = self.request("GET", "/v1/health", accept=(503,))
        return p.load_json(p.HealthReply, resp.body)

    def sidecar_policy(self, path: str) -> p.SidecarPolicy | None:
        """How the daemon names and keeps the sidecar of the image at ``path`` (absolute, directory
        resolved): its watch root's naming inputs and ``existing`` policy. None from a daemon that
        predates ``/v1/sidecar`` (404); its ``/v1/status`` then has the global policy."""
        resp = self.request("GET", "/v1/sidecar", query={"path": path}, accept=(404,))
        if resp.status == 404:
            return None
        return p.load_json(p.SidecarPolicy, resp.body)

    def captioned(self, report: p.CaptionedRequest) -> p.CaptionedReply | None:
        """Tell the daemon that phicapctl wrote this caption itself, so its journal tracks it (the
        scans, ``stale``). None from a daemon that predates ``/v1/captioned`` (404)."""
        body = p.dump_json(report)
        resp = self.request("POST", "/v1/captioned", body=body, content_type="application/json", accept=(404,))
        if resp.status == 404:
            return None
        return p.load_json(p.CaptionedReply, resp.body)

    def version(self) -> p.VersionReply:
        return p.VersionReply.model_validate(self._get_json("/v1/version"))

    def failures(self, limit: int = 50) -> list[dict[str, Any]]:
        return p.FailuresReply.model_validate(self._get_json("/v1/failures", {"limit": limit})).failures

    def retry(self, paths: list[str] | None = None) -> int:
        reply = self._post_json("/v1/failures/retry", p.RetryRequest(paths=paths).model_dump())
        return p.RetryReply.model_validate(reply).requeued

    def stale(self, directory: str | None = None) -> p.StaleReply:
        query = {"dir": directory} if directory is not None else {}
        return p.StaleReply.model_validate(self._get_json("/v1/stale", query))

    def recaption_stale(self, directory: str | None = None, *, force: bool = False) -> p.RecaptionReply:
        body = p.RecaptionRequest(stale=True, dir=directory, force=force).model_dump()
        return p.RecaptionReply.model_validate(self._post_json("/v1/recaption", body))

    def pause(self) -> None:
        self._post_json("/v1/pause")

    def resume(self) -> None:
        self._post_json("/v1/resume")

    def rescan(self) -> None:
        self._post_json("/v1/rescan")

    def metrics(self) -> str:
        return self.request("GET", "/metrics").body.decode()

    def caption_bytes(
        self,
        data: bytes,
        *,
        name: str,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        path: str | None = None,
        sidecar: str | None = None,
        provenance: bool = False,
    ) -> p.CaptionResult:
        """``path``: where ``data`` was read (absolute, directory resolved), so the daemon applies
        its watch root's prompt and prefix/suffix; ``sidecar``: the file name the caption is
        written to beside it, which the daemon's journal then keeps that image's; see
        ``p.CaptionParams``."""
        query = {"name": name, "prompt": prompt, "max_new_tokens": max_new_tokens, "path": path, "sidecar": sidecar}
        if provenance:
            query["provenance"] = "true"
        resp = self.request(
            "POST",
            "/v1/caption",
            body=data,
            query=query,
            content_type="application/octet-stream",
            timeout=self.caption_timeout,
        )
        return p.load_json(p.CaptionResult, resp.body)

    def caption_url(self, url: str, *, prompt: str | None = None, max_new_tokens: int | None = None) -> p.CaptionResult:
        payload = p.CaptionUrlRequest(url=url, prompt=prompt, max_new_tokens=max_new_tokens).model_dump()
        return p.CaptionResult.model_validate(self._post_json("/v1/caption-url", payload, timeout=self.caption_timeout))
