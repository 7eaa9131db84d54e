"""``python -m tests.support.fake_daemon CONFIG``: the real daemon process with the fake model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from phicapd import service
from phicapd.config import load_settings
from phicapd.log import configure_logging
from phicapd.service import run
from tests.support.fakes import FakeCaptioner


def main() -> int:
    settings = load_settings(Path(sys.argv[1]))
    configure_logging(settings.log.format, settings.log.level)
    latency = float(os.environ.get("FAKE_LATENCY", "0"))
    record = Path(os.environ["FAKE_RECORD"])
    load_seconds = float(os.environ.get("FAKE_LOAD_SECONDS", "0"))
    # After an interrupted load: what a download's thread pool does, finishing its running files.
    linger = float(os.environ.get("FAKE_LOAD_LINGER", "0"))
    service.EXTEND_EVERY_SECONDS = float(os.environ.get("FAKE_EXTEND_EVERY", service.EXTEND_EVERY_SECONDS))

    def load(_settings: object) -> FakeCaptioner:
        try:
            time.sleep(load_seconds)  # a download or a compile
        finally:
            time.sleep(linger)
        return FakeCaptioner(latency=latency, record=record)

    if marker := os.environ.get("FAKE_KILL_BETWEEN_FORMATS"):
        _kill_between_formats(Path(marker))
    if os.environ.get("FAKE_ABORT_ON_HOSTILE"):
        _abort_on_hostile()
    if fifo := os.environ.get("FAKE_STUCK_ON_FIFO"):
        _stuck_on(Path(fifo))
    if deadline := os.environ.get("FAKE_STOP_DEADLINE"):
        from phicapd import stop_deadline

        stop_deadline.SECONDS = float(deadline)
    reload_on_hup = True if os.environ.get("FAKE_RELOAD_ON_HUP") else None  # as `run --reload-on-hup`
    return run(settings, load, settings_loader=lambda: load_settings(Path(sys.argv[1])), reload_on_hup=reload_on_hup)


def _kill_between_formats(marker: Path) -> None:
    """``kill -9`` this process once (while ``marker`` does not exist), in the writer's first
    multi-format group, after its ``.txt`` files are on disk and before anything else is."""
    import signal

    from phicapd.pipeline import writer

    real = writer.write_sidecars

    def write_then_die(items, pool=None, keep=()):  # type: ignore[no-untyped-def]
        if marker.exists() or not any(str(path).endswith(".json") for path, _ in items):
            return real(items, pool, keep)
        real([item for item in items if str(item[0]).endswith(".txt")], pool, keep)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

    writer.write_sidecars = write_then_die  # type: ignore[assignment]


def _abort_on_hostile() -> None:
    """Die as a segfault in a C image decoder would (SIGABRT, no Python cleanup) whenever a
    decode worker decodes a file whose name contains "hostile"."""
    from phicapd.pipeline import decode_pool

    script = Path(__file__).with_name("crashing_decode_worker.py")
    decode_pool.WORKER_COMMAND = [sys.executable, str(script), "abort"]


def _stuck_on(fifo: Path) -> None:
    """A thread that never returns from a system call, as one did in ``open()`` on a named pipe:
    not a daemon thread, so the interpreter's exit waits for it, as for a pool's worker."""
    import threading

    threading.Thread(target=os.open, args=(fifo, os.O_RDONLY), name="stuck-on-a-pipe", daemon=False).start()


if __name__ == "__main__":
    sys.exit(main())
