"""A deterministic stand-in for the model, for pipeline tests only (the product never ships it)."""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd.captioner import Caption, CaptionRequest, Deliver, Take


def image_key(image: Image.Image) -> str:
    """A content key for an image, so calls can be counted per image whatever its path."""
    return hashlib.sha1(image.tobytes()).hexdigest()[:16]


class FakeCaptioner:
    """Captions are a pure function of the pixels; every call is counted (and optionally logged
    to a file with one O_APPEND write per caption, so counts survive ``kill -9``).

    A batch-only backend: ``stream`` runs ``caption`` batch after batch. Every member of the
    ``Captioner`` protocol is here (``tests/core/test_captioner_protocol.py`` checks it), so a
    double behaves as a backend would wherever the daemon calls it."""

    identity = "fake@test"
    continuous_batching = False
    kept_image_side = 2048  # the native model's, for a subclass that prepares
    waiting: str | None = None  # always there to take work

    def __init__(
        self,
        *,
        max_batch: int = 16,
        latency: float = 0.0,
        record: Path | None = None,
        fail_keys: set[str] | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.latency = latency
        self.calls: collections.Counter[str] = collections.Counter()
        self.batch_sizes: list[int] = []
        self.fail_keys = fail_keys or set()
        self._lock = threading.Lock()
        self._record_fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if record else None
        self.closed = False

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        if self.latency:
            time.sleep(self.latency)
        out = []
        keys = [image_key(r.image) for r in batch]
        if any(k in self.fail_keys for k in keys):
            raise RuntimeError("fake model failure")
        with self._lock:
            self.batch_sizes.append(len(batch))
            for request, key in zip(batch, keys, strict=True):
                self.calls[key] += 1
                if self._record_fd is not None:
                    os.write(self._record_fd, f"{key}\n".encode())
                w, h = request.image.size
                out.append(Caption(f"A {w}x{h} test image {key}.", new_tokens=7))
        return out

    def prepare(self, image: Image.Image) -> Any:
        return None  # captions are made from the pixels themselves

    def stream(self, take: Take, deliver: Deliver) -> None:
        while batch := take(self.max_batch, True):
            for request, caption in zip(batch, self.caption(batch), strict=True):
                deliver(request, caption)

    def warm_up(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def stopping(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        if self._record_fd is not None:
            os.close(self._record_fd)
            self._record_fd = None


class StreamingFakeCaptioner(FakeCaptioner):
    """The fake with the native engine's shape: each row takes ``steps`` decode steps of
    ``step_latency`` s, and new requests are taken before every step (continuous batching)."""

    continuous_batching = True

    def __init__(self, *, steps: int = 20, step_latency: float = 0.005, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.steps, self.step_latency = steps, step_latency
        self.running: list[frozenset[str]] = []  # the image keys on the model at each step
        self.joined: dict[str, int] = {}  # image key -> rows already running when it was admitted

    def stream(self, take: Take, deliver: Deliver) -> None:
        rows: list[tuple[CaptionRequest, str, int]] = []  # request, key, step it finishes after
        step = 0
        while True:
            for request in take(self.max_batch - len(rows), not rows):
                self.joined[image_key(request.image)] = len(rows)
                rows.append((request, image_key(request.image), step + self.steps))
            if not rows:
                return
            self.running.append(frozenset(key for _, key, _ in rows))
            time.sleep(self.step_latency)
            step += 1
            for row in [r for r in rows if r[2] == step]:
                rows.remove(row)
                deliver(row[0], self.caption([row[0]])[0])


def unique_image(index: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    """A tiny image whose pixels encode ``index``."""
    image = Image.new("RGB", size, ((index >> 16) & 255, (index >> 8) & 255, index & 255))
    image.putpixel((0, 0), (index % 251, (index // 251) % 251, 7))
    return image


def write_unique_png(path: Path, index: int, *, rename_in: bool = False) -> str:
    """Write a unique tiny PNG in place, or to a partial name renamed in at the end; returns its key."""
    image = unique_image(index)
    target = path.with_name(path.name + ".part") if rename_in else path
    image.save(target, format="PNG")
    if rename_in:
        os.replace(target, path)
    return image_key(image)
