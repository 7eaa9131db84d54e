"""The control protocol: request and reply models, error codes and their HTTP statuses.

Everything that crosses the socket is validated by one of these pydantic models, on the server
when it parses a request and in ``phicapctl`` when it reads a reply. The README's "control
socket API" section has the endpoint table.

File names are bytes: a path that is not UTF-8 crosses the socket reversibly, percent-encoded
bytes in a query string and the lone-surrogate escape ``\\udcXX`` (one per byte) in JSON, which
is why every model is written and read with ``dump_json`` / ``load_json`` (``phicapd.fsnames``).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from phicapd.config import ExistingPolicy, XmpNaming
from phicapd.errors import BAD_REQUEST as BAD_REQUEST
from phicapd.errors import CAPTION_NOT_WRITTEN as CAPTION_NOT_WRITTEN
from phicapd.errors import CAPTION_TIMEOUT as CAPTION_TIMEOUT
from phicapd.errors import IMAGE_GONE as IMAGE_GONE
from phicapd.errors import NOT_READY as NOT_READY
from phicapd.errors import NOT_WATCHED as NOT_WATCHED
from phicapd.errors import FetchError, ImageError, PhicapError

API_VERSION = 1
MAX_PROMPT_CHARS = 8192
MAX_NEW_TOKENS = 4096
MAX_FAILURES_LIMIT = 1000

# Codes the control layer itself produces (and, imported above, those of the daemon's API that
# ``error_status`` maps). Backend errors keep their own ``PhicapError.code``.
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
REQUEST_TIMEOUT = "request_timeout"
NOT_IMPLEMENTED = "not_implemented"
PAYLOAD_TOO_LARGE = "payload_too_large"
HEADERS_TOO_LARGE = "headers_too_large"
VERSION_NOT_SUPPORTED = "http_version_not_supported"
BUSY = "busy"
INTERNAL = "internal"


_M = TypeVar("_M", bound=BaseModel)


# File names are bytes (``phicapd.fsnames``): a name that is not UTF-8 is a ``str`` with lone
# surrogates (U+DC80..U+DCFF, one per byte). In a query string it travels percent-encoded
# (``%FF``); in a JSON body or reply as the escape ``\udcff``, which JSON's grammar allows and
# Python's ``json`` reads back to the same ``str``. pydantic's own JSON refuses lone surrogates
# both ways, so every model crosses the socket through these two.
def dump_json(model: BaseModel, **kwargs: Any) -> bytes:
    """``model`` as the JSON the socket carries (ASCII, names that are not UTF-8 escaped)."""
    return json.dumps(model.model_dump(mode="json", **kwargs), separators=(",", ":")).encode()


def load_json(model: type[_M], body: bytes | str) -> _M:
    """The inverse of ``dump_json``; invalid JSON raises pydantic's ``ValidationError``."""
    try:
        data = json.loads(body)
    except ValueError:
        return model.model_validate_json(body)  # not JSON: raises pydantic's error saying so
    return model.model_validate(data)


def _name_length(value: str) -> str:
    # pydantic's own length constraints refuse a str with lone surrogates, so they are checked here.
    if not 1 <= len(value) <= 4096:
        raise ValueError("must be 1 to 4096 characters")
    return value


#: A path or file name: any bytes Linux allows (see ``dump_json``), 1 to 4096 characters.
FsName = Annotated[str, AfterValidator(_name_length)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorDetail(_Model):
    code: str
    message: str
    retryable: bool = False


class ErrorReply(_Model):
    error: ErrorDetail


class CaptionParams(_Model):
    """Query parameters of ``POST /v1/caption`` (the body is the raw image)."""

    name: FsName = "upload"
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    # Where the client read the image: absolute, directory resolved. Only a key for the watch
    # root's prompt, prefix and suffix; the daemon never opens it (the bytes are the body).
    path: FsName | None = None
    # The sidecar file name the client writes beside ``path`` (its own naming, from
    # ``/v1/sidecar``): once captioned, the journal keeps that name the image's.
    sidecar: FsName | None = None
    # Ask for ``CaptionResult.provenance`` (what phicapctl writes into photo.json). Only sent to
    # a daemon whose ``/v1/sidecar`` reports formats, so an older one never sees it.
    provenance: bool = False

    @field_validator("path")
    @classmethod
    def _plain_absolute(cls, value: str | None) -> str | None:
        return _plain_absolute_path(value)

    @field_validator("sidecar")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        return None if value is None else _file_name(value)


def _file_name(value: str) -> str:
    if "/" in value or "\0" in value or value in (".", ".."):
        raise ValueError("must be a file name without '/'")
    return value


def _plain_absolute_path(value: str | None) -> str | None:
    # Compared as a string against the roots, so ".." would let a path name a root it is not in.
    if value is not None and (not value.startswith("/") or "\0" in value or ".." in PurePosixPath(value).parts):
        raise ValueError("must be an absolute path without '..'")
    return value


class SidecarParams(_Model):
    """Query of ``GET /v1/sidecar``: the image path, as ``CaptionParams.path``."""

    path: FsName

    @field_validator("path")
    @classmethod
    def _plain_absolute(cls, value: str) -> str:
        _plain_absolute_path(value)
        return value


class CaptionUrlRequest(_Model):
    url: str = Field(min_length=1, max_length=8192)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)


class CaptionResult(_Model):
    caption: str
    new_tokens: int
    model: str
    seconds: float
    url: str | None = None
    # The watch root whose prompt and prefix/suffix were applied (caption requests with a
    # ``path`` under a root). Left out of the JSON when None, so older clients still parse it.
    root: str | None = None
    # With ``provenance=true``: {"model", "revision", "backend", "prompt", "generation"}, the
    # JSON sidecar's keys that only the daemon knows, and under a watch root "settings_key"
    # (``outputs.provenance.settings_key``, what ``/v1/captioned`` reports back). Left out of the
    # JSON otherwise.
    provenance: dict[str, Any] | None = None


class CaptionedRequest(_Model):
    """``POST /v1/captioned``: phicapctl wrote the caption of the image at ``path`` (under a watch
    root) itself; the journal records it as the daemon's writer records its own, so the scans,
    ``phicapctl stale`` and ``recaption --stale`` treat it alike."""

    path: FsName  # as ``CaptionParams.path``
    # The name of the image's first per-image file (``photo.txt``; the naming rule's name, as
    # ``CaptionParams.sidecar``); None for a root that writes none (``embed``, ``jsonl`` only).
    sidecar: FsName | None = None
    caption: str = Field(max_length=1024 * 1024)  # as written: prefix and suffix included
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the bytes captioned (before embedding)
    model: str = Field(min_length=1, max_length=4096)
    backend: str | None = Field(None, max_length=64)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    settings_key: str = Field(pattern=r"^[0-9a-f]{1,64}$")  # ``CaptionResult.provenance``'s

    @field_validator("path")
    @classmethod
    def _plain_absolute(cls, value: str) -> str:
        _plain_absolute_path(value)
        return value

    @field_validator("sidecar")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        return None if value is None else _file_name(value)


class CaptionedReply(_Model):
    # False: the image is on the model right now (the daemon's own caption will follow), so the
    # journal was left as it is.
    recorded: bool


class FailuresParams(_Model):
    limit: int = Field(50, ge=1, le=MAX_FAILURES_LIMIT)


class FailuresReply(_Model):
    failures: list[dict[str, Any]]


class RetryRequest(_Model):
    """``paths`` null or absent re-queues every failed job."""

    paths: list[str] | None = None


class RetryReply(_Model):
    requeued: int


class StaleParams(_Model):
    """``dir``: an absolute directory under a watch root (absent: every root)."""

    dir: str | None = None


class StaleEntry(_Model):
    path: str
    root: str
    model: str | None = None
    prompt: str | None = None


class StaleReply(_Model):
    # Captions made with other settings than their root's current ones, which
    # ``POST /v1/recaption`` redoes; ``edited``: stale too, but their file was changed since the
    # daemon wrote it (a person), so they are redone only with ``force``.
    stale: list[StaleEntry]
    edited: list[StaleEntry]


class RecaptionRequest(_Model):
    """Re-queue the stale captions under ``dir`` (every root when null); ``force``: the edited
    ones too. ``stale`` must be true: it is the only selection there is so far."""

    stale: bool
    dir: str | None = None
    force: bool = False


class RecaptionReply(_Model):
    requeued: int
    edited_kept: int  # edited captions left alone (no ``force``)


class OkReply(_Model):
    ok: bool = True


class HealthReply(_Model):
    """``ready``: the model is loaded. ``captioning``: a caption can be made now (the answer is
    200 then, else 503), which ``ready`` alone does not say while every remote endpoint is down.
    ``state`` is ``/v1/status``'s; ``reason`` says why no caption can be made. The three are
    None from a daemon that predates them."""

    ready: bool
    captioning: bool | None = None
    state: str | None = None
    reason: str | None = None


class VersionReply(_Model):
    version: str
    api: int = API_VERSION


class SidecarInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    extension: str = ".txt"
    existing: ExistingPolicy = "skip"


class RootNaming(BaseModel):
    """What the sidecar naming rule needs of a watch root (``pipeline.paths.list_images``).

    ``path`` is the root as the requested path sees it: the configured directory, or its resolved
    form when the request's path lies under that instead (a symlinked root).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str
    recursive: bool = True
    include: list[str]
    ignore: list[str] = []


class SidecarPolicy(BaseModel):
    """``GET /v1/sidecar``: how the daemon names and keeps the sidecar of an image at ``path``.

    ``root`` is the watch root that owns the path (None outside every root); ``existing`` is that
    root's policy, else the global one. Unknown fields are ignored, so the reply can grow.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    extension: str = ".txt"
    existing: ExistingPolicy = "skip"
    root: RootNaming | None = None
    # What is written for each caption (``[sidecar] formats``, the root's own). phicapctl writes
    # them all, except a watch root's ``jsonl``: that manifest is the daemon's writer's, which
    # merges the caption in when phicapctl reports it (``/v1/captioned``).
    formats: list[str] = ["txt"]
    # How the XMP sidecar is named (``[sidecar] xmp_naming``, the root's own).
    xmp_naming: XmpNaming = "stem"
    # Sidecars already given to images of the path's directory: image name -> sidecar name
    # without the extension (``outputs.naming.Claims``). Empty outside every root; None from a
    # daemon that predates claims (it also refuses ``CaptionParams.sidecar``).
    claims: dict[str, str] | None = None


class StatusReply(BaseModel):
    """The daemon's status. Only what phicapctl relies on is typed; the rest passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # "waiting": ready, but the backend cannot take work now (every remote endpoint is down).
    state: Literal["loading", "ready", "paused", "waiting", "stopping"]
    sidecar: SidecarInfo = SidecarInfo()
    # ``[control] max_body_bytes``: phicapctl refuses a larger file unread (None: an older daemon).
    max_body_bytes: int | None = None


def error_status(exc: PhicapError) -> int:
    """The HTTP status for a backend error.

    A rejected input (undecodable image, refused URL) is the client's problem: 422. A URL that
    failed for a transient reason (the remote timed out) is a bad gateway: 502. Anything else
    is ours: 503 when trying again may help (model busy, timeout), 500 when it will not.
    """
    if isinstance(exc, ImageError):
        return 422
    if isinstance(exc, FetchError):
        return 502 if exc.retryable else 422
    if exc.code == CAPTION_TIMEOUT:
        return 504
    if exc.code in (NOT_WATCHED, IMAGE_GONE, CAPTION_NOT_WRITTEN):
        return 422
    if exc.code == BAD_REQUEST:
        return 400
    return 503 if exc.retryable else 500


def error_body(code: str, message: str, *, retryable: bool = False) -> ErrorReply:
    return ErrorReply(error=ErrorDetail(code=code, message=message, retryable=retryable))
