"""Where the daemon is in its life: what ``service.Daemon`` moves on and the control API reports.

"starting" -> "loading" (the socket answers, the model loads) -> "ready" -> "stopping". Only
the daemon's main thread writes it; the control server's threads read it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["starting", "loading", "ready", "stopping"]


@dataclass
class Lifecycle:
    #: Why the model is not ready yet, for ``phicapctl status``: what is loaded from where, or
    #: why the load waits to try again.
    loading: str
    phase: Phase = "starting"
    started_at: float = field(default_factory=time.time)
    #: The last reload that was refused, {"at": epoch seconds, "reason"}, until one succeeds:
    #: ``phicapctl status`` shows it, not only the log.
    reload_refused: dict[str, Any] | None = None
    #: ``phicapctl pause`` came while the model loaded: the scheduler starts paused.
    pause_asked: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def is_ready(self) -> bool:
        """The model is warm and the daemon is not stopping."""
        return self.ready.is_set() and not self.stop.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)
