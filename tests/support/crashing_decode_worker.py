"""The real decode worker, except on an image whose path or name contains "hostile": there it
aborts (argv "abort", as a segfault in a C decoder ends) or never answers (argv "hang", an
endless loop). The daemon's arguments follow the mode.

Run as a script (``python tests/support/crashing_decode_worker.py abort FD ...``): it needs only
phicapd.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from phicapd.pipeline import decode_worker

MODE = sys.argv.pop(1)


def crashing(decoder: decode_worker.Decoder) -> decode_worker.Handler:
    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if "hostile" in Path(str(request.get("path") or request.get("name") or "")).name:
            if MODE == "abort":
                os.abort()
            while True:
                time.sleep(60)
        return decoder.handle(request)

    return handle


if __name__ == "__main__":
    decode_worker.main(crashing)
