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

    return run(settings, load, settings_loader=lambda: load_settings(Path(sys.argv[1])))


if __name__ == "__main__":
    sys.exit(main())
