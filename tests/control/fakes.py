"""A deterministic ControlBackend for the control tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from phicapd.control.backend import CaptionReply
from phicapd.errors import CaptionError, FetchError, ImageError, PhicapError

# Images the fake accepts start with this; "BAD" bytes are rejected, "FAIL" bytes fail.
GOOD_MAGIC = b"\x89PNG"


class FakeBackend:
    """Captions bytes deterministically and records what it was sent."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.ready.set()
        self.received: list[tuple[str, bytes]] = []
        self.paths: list[Path | None] = []
        self.sidecars: list[str | None] = []
        self.root: str | None = None  # reported as the applied watch root when a path is sent
        self.paused = False
        self.rescans = 0
        self.retried: list[list[str] | None] = []
        self.stale_asked: list[Path | None] = []
        self.recaptioned: list[tuple[Path | None, bool]] = []
        self.existing = "skip"
        # What GET /v1/sidecar reports for a path under ``naming_root["path"]``: its naming inputs
        # and ``root_existing`` (None: the global ``existing``). Asked paths land in ``policy_paths``.
        self.naming_root: dict[str, Any] | None = None
        self.root_existing: str | None = None
        self.policy_paths: list[Path] = []
        self.delay = 0.0
        # name -> the name whose caption must be done first (finish out of order, without sleeps)
        self.waits_for: dict[str, str] = {}
        self.waiting: str | None = None  # why no caption can be made, as the remote backend says
        self._captioned: set[str] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def health(self) -> dict[str, Any]:
        ready = self.is_ready()
        reason = None if ready else "loading the model"
        if ready and self.waiting is not None:
            reason = self.waiting
        state = "loading" if not ready else "waiting" if self.waiting else "ready"
        return {"ready": ready, "captioning": ready and reason is None, "state": state, "reason": reason}

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
        with self._lock:
            self.received.append((name, data))
            self.paths.append(path)
            self.sidecars.append(sidecar)
        if self.delay:
            time.sleep(self.delay)
        if (first := self.waits_for.get(name)) is not None:
            with self._done:
                assert self._done.wait_for(lambda: first in self._captioned, timeout=30), f"{first} never came"
        try:
            return self._caption(data, name, prompt, max_new_tokens, path)
        finally:
            with self._done:
                self._captioned.add(name)
                self._done.notify_all()

    def _caption(
        self, data: bytes, name: str, prompt: str | None, max_new_tokens: int | None, path: Path | None
    ) -> CaptionReply:
        if data.startswith(b"BAD"):
            raise ImageError(f"{name}: not an image", code="image_unsupported")
        if data.startswith(b"FAIL"):
            raise CaptionError("the model failed", code="caption_failed", retryable=False)
        text = f"caption of {name} ({len(data)} bytes)"
        if prompt:
            text += f" for {prompt!r}"
        root = self.root if path is not None else None
        return CaptionReply(text=text, new_tokens=max_new_tokens or 7, model="fake@1", seconds=0.01, root=root)

    def caption_url(self, url: str, *, prompt: str | None, max_new_tokens: int | None, timeout: float) -> CaptionReply:
        if "refused" in url:
            raise FetchError(f"{url}: address not allowed", code="url_address_refused")
        return CaptionReply(text=f"caption of {url}", new_tokens=5, model="fake@1", seconds=0.02, url=url)

    def sidecar_policy(self, path: Path) -> dict[str, Any]:
        with self._lock:
            self.policy_paths.append(path)
        root = self.naming_root
        if root is None or not path.is_relative_to(root["path"]):
            return {"extension": ".txt", "existing": self.existing, "root": None}
        return {"extension": ".txt", "existing": self.root_existing or self.existing, "root": root}

    def status(self) -> dict[str, Any]:
        return {
            "state": "ready" if self.is_ready() else "loading",
            "model": {"id": "fake", "resident": self.is_ready()},
            "lanes": {"interactive": 0, "background": 3},
            "journal": {"pending": 3, "failed": 1},
            "throughput": {"images_per_second": 1.5},
            "recent_failures": [],
            "gpu": None,
            "sidecar": {"extension": ".txt", "existing": self.existing},
        }

    def failures(self, limit: int) -> list[dict[str, Any]]:
        rows = [{"path": f"/srv/photos/{i}.jpg", "code": "image_truncated", "attempts": 3} for i in range(3)]
        return rows[:limit]

    def retry(self, paths: list[str] | None) -> int:
        self.retried.append(paths)
        return 3 if paths is None else sum("not-failed" not in p for p in paths)

    def stale(self, directory: Path | None) -> dict[str, list[dict[str, Any]]]:
        self.stale_asked.append(directory)
        if directory is not None and not str(directory).startswith("/watched"):
            raise PhicapError(f"{directory} is under no watch root", code="not_watched")
        entry = {"path": "/watched/a.jpg", "root": "/watched", "model": "m@r", "prompt": "old"}
        return {"stale": [entry], "edited": [{**entry, "path": "/watched/b.jpg"}]}

    def recaption_stale(self, directory: Path | None, force: bool) -> tuple[int, int]:
        self.recaptioned.append((directory, force))
        return (2, 0) if force else (1, 1)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def rescan(self) -> None:
        self.rescans += 1

    def metrics(self) -> str:
        return "# TYPE phicapd_images_total counter\nphicapd_images_total 42\n"
