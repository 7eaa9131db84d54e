"""The worker processes' side of their protocol (``exiv2_worker``, ``decode_worker``): one JSON
request per line on stdin, one answer per line on stdout, in order. Kept apart so that a worker
imports only what it needs (a decode worker starts without exiv2, structlog or pydantic)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, BinaryIO

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def serve(requests: BinaryIO, answers: BinaryIO, handler: Handler) -> None:
    """Answer requests until stdin closes (the parent exited or let this worker go)."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as e:
            answer: dict[str, Any] = {"error": "ValueError", "message": f"not a JSON request: {e}"}
        else:
            answer = handler(request)
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()
