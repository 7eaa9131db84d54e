"""phicapctl's output conventions: errors on stderr prefixed ``phicapctl:``, one JSON document
per line on stdout, values flattened for tables, and the exit code of each client error."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from phicapd.control import batch
from phicapd.control.client import ControlClientError, DaemonUnreachable, RequestRejected
from phicapd.fsnames import display


def err(message: str) -> None:
    print(f"phicapctl: {display(message)}", file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


def flatten(value: Any, key: str = "") -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={flatten(v, k)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        if key and all(isinstance(v, str | int | float) for v in value):
            return ",".join(map(str, value)) or "-"  # a short list inside a record: formats=txt,json
        return f"{len(value)} entries"
    if value is None:
        return "-"
    if isinstance(value, float) and (key == "at" or key.endswith("_at")):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))  # epoch seconds
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def exit_code_of(e: ControlClientError) -> int:
    if isinstance(e, DaemonUnreachable):
        return batch.EX_UNAVAILABLE
    return batch.EX_DATAERR if isinstance(e, RequestRejected) else batch.EX_SOFTWARE
