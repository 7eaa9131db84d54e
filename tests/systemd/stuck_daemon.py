"""``python -m tests.systemd.stuck_daemon CONFIG TRIGGER STALL_SECONDS``

The real daemon on the real model, except that once TRIGGER exists the model blocks forever
between two steps (and every batch call blocks at once), like a CUDA kernel that never
returns. The stall threshold (300 s in the product) is shortened so the watchdog's reaction
fits in a test.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phicapd import service
from phicapd.config import Settings, load_settings
from phicapd.log import configure_logging


class HangingCaptioner:
    def __init__(self, inner: Any, trigger: Path) -> None:
        self._inner = inner
        self._trigger = trigger

    def caption(self, batch: Sequence[Any]) -> Any:
        self._hang_if_triggered()
        return self._inner.caption(batch)

    def stream(self, take: Callable[[int, bool], Any], deliver: Callable[..., None]) -> None:
        def stuck_take(room: int, idle: bool) -> Any:
            self._hang_if_triggered()
            return take(room, idle)

        self._inner.stream(stuck_take, deliver)

    def _hang_if_triggered(self) -> None:
        if self._trigger.exists():
            threading.Event().wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> int:
    config, trigger, stall = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    settings = load_settings(config)
    configure_logging(settings.log.format, settings.log.level)
    service.STALL_SECONDS = stall

    def factory(s: Settings) -> Any:
        return HangingCaptioner(service.load_model_captioner(s), trigger)

    return service.run(settings, factory)


if __name__ == "__main__":
    sys.exit(main())
