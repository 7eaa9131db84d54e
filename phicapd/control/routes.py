"""Endpoints: one parsed request in, one response out, by calls on the ``ControlBackend``.

No sockets here. The server asks ``limits`` before it reads a body (so that an unknown path or
an oversized body is refused without reading it) and then calls ``handle``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from phicapd import __version__
from phicapd.config import ControlSettings
from phicapd.control import protocol as p
from phicapd.control.backend import CaptionReply, ControlBackend
from phicapd.control.http_framing import HttpError, Request
from phicapd.errors import ImageError, PhicapError

log = structlog.get_logger(__name__)

_JSON_BODY_LIMIT = 1024 * 1024
_NO_BODY_LIMIT = 64 * 1024  # tolerated and ignored on endpoints that take no body
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, model: BaseModel) -> Response:
    return Response(status, p.dump_json(model))


def error_response(
    status: int, code: str, message: str, *, retryable: bool = False, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = p.dump_json(p.error_body(code, message, retryable=retryable))
    return Response(status, body, headers=headers)


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise HttpError(400, p.BAD_REQUEST, problems, close=False) from None


def _directory(value: str | None) -> Path | None:
    """A ``dir`` parameter: an absolute path (the client resolves relative ones), or None."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute() or "\0" in value:
        raise HttpError(400, p.BAD_REQUEST, f"dir must be an absolute path, got {value[:200]!r}", close=False)
    return Path(os.path.normpath(path))


def _json_body(req: Request) -> dict[str, Any]:
    if not req.body.strip():
        return {}
    try:
        data = json.loads(req.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, p.BAD_REQUEST, f"body is not valid JSON: {e}", close=False) from None
    except RecursionError:
        # The C decoder recurses per level; "[" * 100_000 must be the client's error, not a 500.
        raise HttpError(400, p.BAD_REQUEST, "body is not valid JSON: nested too deeply", close=False) from None
    if not isinstance(data, dict):
        raise HttpError(400, p.BAD_REQUEST, "body must be a JSON object", close=False)
    return data


def _caption_result(reply: CaptionReply) -> p.CaptionResult:
    return p.CaptionResult(
        caption=reply.text,
        new_tokens=reply.new_tokens,
        model=reply.model,
        seconds=reply.seconds,
        url=reply.url,
        root=reply.root,
        provenance=reply.provenance,
    )


def _caption_response(result: p.CaptionResult) -> Response:
    # "root" only when a root applied: clients from before it existed reject unknown fields.
    exclude = {name for name in ("root", "provenance") if getattr(result, name) is None}
    return Response(200, p.dump_json(result, exclude=exclude))


class Router:
    def __init__(
        self,
        backend: ControlBackend,
        settings: ControlSettings,
        *,
        extra_metrics: Callable[[], str] = lambda: "",
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.extra_metrics = extra_metrics
        handler = Callable[[Request], Response]
        self._routes: dict[str, dict[str, tuple[handler, int]]] = {
            "/v1/caption": {"POST": (self._caption, settings.max_body_bytes)},
            "/v1/caption-url": {"POST": (self._caption_url, _JSON_BODY_LIMIT)},
            "/v1/sidecar": {"GET": (self._sidecar, _NO_BODY_LIMIT)},
            "/v1/captioned": {"POST": (self._captioned, _JSON_BODY_LIMIT)},
            "/v1/status": {"GET": (self._status, _NO_BODY_LIMIT)},
            "/v1/health": {"GET": (self._health, _NO_BODY_LIMIT)},
            "/v1/version": {"GET": (self._version, _NO_BODY_LIMIT)},
            "/v1/failures": {"GET": (self._failures, _NO_BODY_LIMIT)},
            "/v1/failures/retry": {"POST": (self._retry, _JSON_BODY_LIMIT)},
            "/v1/stale": {"GET": (self._stale, _NO_BODY_LIMIT)},
            "/v1/recaption": {"POST": (self._recaption, _JSON_BODY_LIMIT)},
            "/v1/pause": {"POST": (self._pause, _NO_BODY_LIMIT)},
            "/v1/resume": {"POST": (self._resume, _NO_BODY_LIMIT)},
            "/v1/rescan": {"POST": (self._rescan, _NO_BODY_LIMIT)},
            "/metrics": {"GET": (self._metrics, _NO_BODY_LIMIT)},
        }

    def body_limit(self, req: Request) -> int:
        """The largest body this request may carry; raises 404/405 for unknown routes."""
        methods = self._routes.get(req.path.rstrip("/") or "/")
        if methods is None:
            raise HttpError(404, p.NOT_FOUND, f"no endpoint {req.path[:200]}", close=False)
        if req.method not in methods:
            allowed = ", ".join(sorted(methods))
            raise HttpError(405, p.METHOD_NOT_ALLOWED, f"{req.path} accepts {allowed}", close=False)
        return methods[req.method][1]

    def endpoint(self, path: str) -> str:
        """``path`` if it is an endpoint, else "other": a metrics label must not take any client's path."""
        path = path.rstrip("/") or "/"
        return path if path in self._routes else "other"

    def allow_header(self, path: str) -> tuple[tuple[str, str], ...]:
        methods = self._routes.get(path.rstrip("/") or "/")
        return (("Allow", ", ".join(sorted(methods))),) if methods else ()

    def handle(self, req: Request) -> Response:
        handler, _ = self._routes[req.path.rstrip("/") or "/"][req.method]
        try:
            return handler(req)
        except HttpError:
            raise
        except PhicapError as e:
            return error_response(p.error_status(e), e.code, e.message, retryable=e.retryable)
        except TimeoutError as e:
            return error_response(504, p.CAPTION_TIMEOUT, str(e) or "timed out", retryable=True)
        except Exception:
            log.exception("control endpoint failed", method=req.method, path=req.path)
            return error_response(500, p.INTERNAL, "internal error; see the daemon's log")

    def _await_ready(self, started: float) -> float:
        """Wait for the model within the caption timeout; return the time left for the caption."""
        budget = self.settings.caption_timeout_seconds
        if not self.backend.is_ready() and not self.backend.wait_ready(budget):
            raise PhicapError(f"the model is not ready after {budget:g} s", code=p.NOT_READY, retryable=True)
        return max(0.001, budget - (time.monotonic() - started))

    def _caption(self, req: Request) -> Response:
        started = time.monotonic()
        params: p.CaptionParams = _parse(p.CaptionParams, req.query)
        if not req.body:
            # What the decoder would say of an empty file: phicapctl sends a file's bytes as they are.
            raise ImageError(f"{params.name}: the file is empty (0 bytes)", code="image_empty")
        timeout = self._await_ready(started)
        reply = self.backend.caption_bytes(
            req.body,
            name=params.name,
            prompt=params.prompt,
            max_new_tokens=params.max_new_tokens,
            timeout=timeout,
            path=Path(params.path) if params.path else None,
            sidecar=params.sidecar,
        )
        if not params.provenance:
            reply = dataclasses.replace(reply, provenance=None)
        return _caption_response(_caption_result(reply))

    def _caption_url(self, req: Request) -> Response:
        started = time.monotonic()
        body: p.CaptionUrlRequest = _parse(p.CaptionUrlRequest, _json_body(req))
        timeout = self._await_ready(started)
        reply = self.backend.caption_url(
            body.url, prompt=body.prompt, max_new_tokens=body.max_new_tokens, timeout=timeout
        )
        return _caption_response(_caption_result(reply))

    def _sidecar(self, req: Request) -> Response:
        params: p.SidecarParams = _parse(p.SidecarParams, req.query)
        policy = p.SidecarPolicy.model_validate(self.backend.sidecar_policy(Path(params.path)))
        return Response(200, p.dump_json(policy))

    def _captioned(self, req: Request) -> Response:
        body: p.CaptionedRequest = _parse(p.CaptionedRequest, _json_body(req))
        recorded = self.backend.captioned(
            Path(body.path),
            sidecar=body.sidecar,
            caption=body.caption,
            sha256=body.sha256,
            model=body.model,
            backend=body.backend,
            prompt=body.prompt,
            settings_key=body.settings_key,
        )
        return json_response(200, p.CaptionedReply(recorded=recorded))

    def _status(self, req: Request) -> Response:
        # Validated on the way out too: phicapctl relies on "state" and "sidecar".
        status = p.StatusReply.model_validate(self.backend.status())
        return Response(200, p.dump_json(status))

    def _health(self, req: Request) -> Response:
        health = self.backend.health()
        return json_response(200 if health["captioning"] else 503, p.HealthReply(**health))

    def _version(self, req: Request) -> Response:
        return json_response(200, p.VersionReply(version=__version__))

    def _failures(self, req: Request) -> Response:
        params: p.FailuresParams = _parse(p.FailuresParams, req.query)
        return json_response(200, p.FailuresReply(failures=self.backend.failures(params.limit)))

    def _retry(self, req: Request) -> Response:
        body: p.RetryRequest = _parse(p.RetryRequest, _json_body(req))
        return json_response(200, p.RetryReply(requeued=self.backend.retry(body.paths)))

    def _stale(self, req: Request) -> Response:
        params: p.StaleParams = _parse(p.StaleParams, req.query)
        reply = self.backend.stale(_directory(params.dir))
        return json_response(200, p.StaleReply.model_validate(reply))

    def _recaption(self, req: Request) -> Response:
        body: p.RecaptionRequest = _parse(p.RecaptionRequest, _json_body(req))
        if not body.stale:
            return error_response(400, p.BAD_REQUEST, "recaption needs stale: true (the only selection so far)")
        requeued, kept = self.backend.recaption_stale(_directory(body.dir), body.force)
        return json_response(200, p.RecaptionReply(requeued=requeued, edited_kept=kept))

    def _pause(self, req: Request) -> Response:
        self.backend.pause()
        return json_response(200, p.OkReply())

    def _resume(self, req: Request) -> Response:
        self.backend.resume()
        return json_response(200, p.OkReply())

    def _rescan(self, req: Request) -> Response:
        self.backend.rescan()
        return json_response(200, p.OkReply())

    def _metrics(self, req: Request) -> Response:
        text = self.backend.metrics()
        if text and not text.endswith("\n"):
            text += "\n"
        return Response(200, (text + self.extra_metrics()).encode(), content_type=METRICS_CONTENT_TYPE)
