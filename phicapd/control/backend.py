"""The seam between the control server and the daemon core.

The server knows nothing about models, queues or journals: it turns HTTP requests into calls
on a ``ControlBackend`` and the answers back into JSON. ``phicapd.control_api`` implements it
(a stand-in while the model loads, then the whole API); the tests use a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CaptionReply:
    text: str
    new_tokens: int
    model: str  # captioner identity
    seconds: float  # time from accept to answer
    url: str | None = None  # final URL for caption-url
    root: str | None = None  # the watch root whose prompt and prefix/suffix were applied
    provenance: dict[str, Any] | None = None  # ``protocol.CaptionResult.provenance``


class ControlBackend(Protocol):
    def is_ready(self) -> bool:
        """Is the model warm?"""
        ...

    def wait_ready(self, timeout: float) -> bool: ...

    def health(self) -> dict[str, Any]:
        """{"ready": the model is loaded, "captioning": a caption can be made now, "state": as in
        ``status``, "reason": why not, or None} (``protocol.HealthReply``). Cheap: probes poll it."""
        ...

    def caption_bytes(
        self,
        data: bytes,
        *,
        name: str,
        prompt: str | None,
        max_new_tokens: int | None,
        timeout: float,
        path: Path | None = None,
        sidecar: str | None = None,
    ) -> CaptionReply:
        """Block until the caption is done; raise ``PhicapError`` (decode errors, timeouts, model errors).

        ``path`` (where the client read ``data``) only selects the watch root whose prompt and
        prefix/suffix apply; it is never opened. ``sidecar`` is the file name the client writes
        the caption to beside ``path``: the journal then keeps that name the image's."""
        ...

    def caption_url(
        self, url: str, *, prompt: str | None, max_new_tokens: int | None, timeout: float
    ) -> CaptionReply: ...

    def sidecar_policy(self, path: Path) -> dict[str, Any]:
        """How the sidecar of the image at ``path`` is named and kept, as the watcher would:
        {"extension", "existing", "root": None | {"path", "recursive", "include", "ignore"},
        "claims": {image name: sidecar base}} (``protocol.SidecarPolicy``). ``path`` is a
        configuration key; it is never opened."""
        ...

    def captioned(
        self,
        path: Path,
        *,
        sidecar: str | None,
        caption: str,
        sha256: str,
        model: str,
        backend: str | None,
        prompt: str,
        settings_key: str,
    ) -> bool:
        """phicapctl wrote ``caption`` for the image at ``path`` (``protocol.CaptionedRequest``):
        record it as a caption of the daemon's. False: the image is on the model right now and the
        journal is left alone. Raises ``PhicapError`` ``not_watched`` for a path under no root,
        ``image_gone`` for one that is not there."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-able; keys include "state" ("loading"|"ready"|"paused"|"stopping"), "model",
        "lanes", "journal", "throughput", "recent_failures", "gpu", "sidecar" ({"extension", "existing"})."""
        ...

    def failures(self, limit: int) -> list[dict[str, Any]]: ...

    def retry(self, paths: list[str] | None) -> int:
        """Re-queue failed jobs (``None`` = all of them); return how many were re-queued."""
        ...

    def stale(self, directory: Path | None) -> dict[str, list[dict[str, Any]]]:
        """{"stale": [...], "edited": [...]} of ``protocol.StaleEntry``; raises ``PhicapError``
        ``not_watched`` when ``directory`` is under no root."""
        ...

    def recaption_stale(self, directory: Path | None, force: bool) -> tuple[int, int]:
        """Re-queue the stale captions under ``directory``; returns (re-queued, edited kept)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def rescan(self) -> None: ...

    def metrics(self) -> str:
        """Prometheus text exposition."""
        ...
