"""``python -m tests.support.fake_daemon CONFIG``: the real daemon process with the fake model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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

    def load(_settings: object) -> FakeCaptioner:
        time.sleep(load_seconds)  # a download or a compile
        return FakeCaptioner(latency=latency, record=record)

    return run(settings, load)


if __name__ == "__main__":
    sys.exit(main())
