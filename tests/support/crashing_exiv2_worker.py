"""The real exiv2 worker, except on a file whose name contains "hostile": there it aborts (argv
"abort", a crash as exiv2's heap overflows end) or never answers (argv "hang", an endless loop).

Run as a script (``python tests/support/crashing_exiv2_worker.py abort``): it needs only phicapd.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from phicapd.outputs import exiv2_worker

MODE = sys.argv[1] if len(sys.argv) > 1 else "abort"


def handle(request: dict[str, Any]) -> dict[str, Any]:
    if "hostile" in Path(str(request.get("path", ""))).name:
        if MODE == "abort":
            os.abort()
        while True:
            time.sleep(60)
    return exiv2_worker.handle(request)


if __name__ == "__main__":
    exiv2_worker.main(handle)
