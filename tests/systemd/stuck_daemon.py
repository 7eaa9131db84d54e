"""``python -m tests.systemd.stuck_daemon CONFIG TRIGGER STALL_SECONDS``

The real daemon on the real model, except that once TRIGGER exists the model blocks forever
between two steps (and every batch call blocks at once), like a CUDA kernel that never
returns. The stall threshold (300 s in the product) is shortened so the watchdog's reaction
fits in a test.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from phicapd import service
from phicapd.captioner import Caption, Captioner, CaptionRequest, Deliver, Take
from phicapd.config import Settings, load_settings
from phicapd.log import configure_logging


class HangingCaptioner:
    """The loaded model, every member passed through, but ``caption`` and ``stream`` hang once
    the trigger file exists."""

    def __init__(self, inner: Captioner, trigger: Path) -> None:
        self._inner = inner
        self._trigger = trigger

    @property
    def identity(self) -> str:
        return self._inner.identity

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch

    @property
    def continuous_batching(self) -> bool:
        return self._inner.continuous_batching

    @property
    def kept_image_side(self) -> int:
        return self._inner.kept_image_side

    @property
    def waiting(self) -> str | None:
        return self._inner.waiting

    def prepare(self, image: Image.Image) -> Any:
        return self._inner.prepare(image)

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        self._hang_if_triggered()
        return self._inner.caption(batch)

    def stream(self, take: Take, deliver: Deliver) -> None:
        def stuck_take(room: int, idle: bool) -> list[CaptionRequest]:
            self._hang_if_triggered()
            return take(room, idle)

        self._inner.stream(stuck_take, deliver)

    def warm_up(self) -> None:
        self._inner.warm_up()

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def stopping(self) -> None:
        self._inner.stopping()

    def close(self) -> None:
        self._inner.close()

    def _hang_if_triggered(self) -> None:
        if self._trigger.exists():
            threading.Event().wait()


def main() -> int:
    config, trigger, stall = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    settings = load_settings(config)
    configure_logging(settings.log.format, settings.log.level)
    service.STALL_SECONDS = stall

    def factory(s: Settings) -> Captioner:
        return HangingCaptioner(service.load_model_captioner(s), trigger)

    return service.run(settings, factory)


if __name__ == "__main__":
    sys.exit(main())
