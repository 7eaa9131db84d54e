"""Errors with stable codes.

Every failure that reaches a user (a sidecar job, a socket reply, a log line) carries a short,
stable, machine-readable ``code`` and says whether trying again later can help. Codes are part
of the public API: the journal stores them, the socket returns them, tests assert on them.
"""

from __future__ import annotations


class PhicapError(Exception):
    """Base class: ``code`` is stable, ``retryable`` says whether a later attempt may succeed."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(PhicapError):
    """The configuration is invalid; the daemon exits with EX_CONFIG (78)."""

    code = "config_invalid"


class ModelUnavailable(PhicapError):
    """The model cannot be loaded *yet*: the Hugging Face Hub or the network failed while
    fetching it, or the GPU is not usable yet (a boot where the NVIDIA driver is not up). The
    daemon exits with EX_TEMPFAIL (75), which systemd's ``Restart=on-failure`` retries; a
    setting that can never work stays a ``ConfigError``."""

    code = "model_unavailable"
    retryable = True


class ImageError(PhicapError):
    """An image could not be decoded safely (codes: ``image_*``)."""

    code = "image_invalid"


class FetchError(PhicapError):
    """A URL could not be fetched safely (codes: ``url_*``)."""

    code = "url_failed"


class CaptionError(PhicapError):
    """The model failed on an image (codes: ``caption_*``, ``model_*``)."""

    code = "caption_failed"
    retryable = True


#: The model's text was empty or only whitespace (retryable; see the scheduler's delivery).
CAPTION_EMPTY = "caption_empty"
#: The image was replaced, rewritten or deleted while its caption was written (``pipeline.writer``):
#: nothing of ours replaced it, and its new bytes are captioned (retryable, no attempt counted).
IMAGE_CHANGED = "image_changed"
#: The XMP sidecar was edited, replaced, created or removed while the caption was merged into it:
#: theirs is kept and ours retried (no attempt counted); the image's other outputs are written.
XMP_CHANGED = "xmp_changed"
#: exiv2 cannot parse the existing XMP sidecar: it is left untouched, the image's other outputs are
#: written, and it is parked until the image changes or ``phicapctl retry`` (the sidecar fixed).
XMP_UNREADABLE = "xmp_unreadable"
#: exiv2 cannot parse the image's own metadata (an EXIF block whose entries point outside it, an
#: ICC profile after the frame header), so ``embed`` cannot write into it: the image is left as
#: it is, parked until it changes or ``phicapctl retry`` (its metadata fixed or stripped).
IMAGE_METADATA_UNREADABLE = "image_metadata_unreadable"
#: The backend returned more than the ``max_new_tokens`` asked for (refused, not cut: see
#: ``phicapd.caption_text``); retryable, a server that ignores ``max_tokens`` may be fixed.
CAPTION_TOO_LONG = "caption_too_long"
#: The daemon died while it was decoding the image (a file that crashes a C decoder): see
#: ``Journal.recover`` and the scheduler's decode gate.
INTERRUPTED_DECODING = "interrupted_decoding"
#: A file beside an image that phicapd would read or replace (a ``.txt``/``.json``/``.xmp``
#: sidecar, ``metadata.jsonl``, the image an embed replaces) is not a regular file: a named pipe,
#: a device, a socket, a directory, or a symbolic link where the file is replaced. Refused, never
#: opened for long, followed or merged; the image is parked (``outputs.safe_files``).
SIDECAR_NOT_REGULAR = "sidecar_not_regular"
#: Such a file is larger than its kind's cap (``outputs.safe_files``: a ``.txt``/``.json``
#: sidecar 1 MiB, an XMP sidecar 16 MiB, a ``metadata.jsonl`` 128 MiB): refused unread, parked.
SIDECAR_TOO_LARGE = "sidecar_too_large"
#: The decode worker crashed or hung on the image (``pipeline.decode_pool``): retryable, so it
#: counts as an attempt and the image is parked after ``max_attempts``.
IMAGE_CRASHED_DECODER = "image_crashed_decoder"
#: The image's name is not valid UTF-8 (bytes from an old share or a zip archive), and an output
#: that must hold it as text cannot: ``metadata.jsonl``'s ``file_name``. Its other outputs are
#: written; it is parked until it is renamed (``phicapd.fsnames``).
NAME_NOT_UTF8 = "name_not_utf8"
#: A camera raw file whose outputs include ``embed`` (phicapctl, under a root or ``[sidecar] formats``
#: that embeds): raw files take their caption in an XMP sidecar, never inside (``raw_roots``).
#: Refused before the model is asked; the daemon's own roots cannot take raw files and embed.
EMBED_RAW_REFUSED = "embed_raw_refused"
#: A renamed or moved image's output could not follow it: a file that is not phicapd's already
#: stands under its new name (never replaced), or the output is not a regular file (a link is never
#: followed). The output stays under its old name; the image keeps its caption (``pipeline.moves``).
MOVE_TARGET_EXISTS = "move_target_exists"

# What the daemon's control API answers (``phicapd.control_api``); ``control.protocol`` maps
# each to its HTTP status.
#: A request whose fields contradict each other or the watch root (a sidecar of another format).
BAD_REQUEST = "bad_request"
#: The model is still loading (or the daemon stops): retryable.
NOT_READY = "not_ready"
#: No caption within the request's timeout: retryable.
CAPTION_TIMEOUT = "caption_timeout"
#: ``/v1/stale``, ``/v1/recaption``, ``/v1/captioned``: a path under no watch root.
NOT_WATCHED = "not_watched"
#: ``/v1/captioned``: the image is not there (any more) to be recorded.
IMAGE_GONE = "image_gone"
#: ``/v1/captioned``: no file of the image holds the caption.
CAPTION_NOT_WRITTEN = "caption_not_written"
#: A socket request while every remote endpoint is down: answered at once instead of after the
#: caption timeout (retryable).
REMOTE_UNAVAILABLE = "remote_unavailable"

EX_TEMPFAIL = 75
EX_CONFIG = 78
