"""The exiv2 worker: the child process in which every pyexiv2 call runs (``metadata`` starts it).

exiv2 is C++ with a long history of crashes and endless loops on crafted files; in the daemon's
own process one such file would take the service down, and the start-up scan would meet it again
after every restart. Here a crash or a hang costs only this process, which the parent replaces.

Protocol: one JSON object per line on stdin, one answer per line on stdout, in order.

* ``{"op": "read", "path": P}`` -> ``{"value": <x-default dc:description or null>}``
* ``{"op": "modify", "path": P, "kinds": ["xmp", "exif", "iptc"], "caption": C}`` -> ``{}``
* an error: ``{"error": "OSError" | "RuntimeError" | "MetadataUnavailable" | <type>, "message": ...}``
  (an ``OSError`` also with ``errno``, ``strerror`` and ``filename``)

Only the parsing and the in-place edit happen here: the parent copies, fsyncs and renames.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

from phicapd.pipeline import worker_protocol
from phicapd.pipeline.metadata import DESCRIPTION, X_DEFAULT, MetadataUnavailable, require
from phicapd.pipeline.worker_protocol import Handler


def read_in_process(path: Path) -> str | None:
    """The x-default ``dc:description`` of ``path``, if it has one (a file exiv2 cannot open or
    parse has none)."""
    pyexiv2 = require()
    try:
        image = pyexiv2.Image(str(path))
    except (OSError, RuntimeError):
        return None
    try:
        value = image.read_xmp().get(DESCRIPTION)
    except RuntimeError:
        return None
    finally:
        image.close()
    if isinstance(value, dict):
        value = value.get(X_DEFAULT) or next(iter(value.values()), None)
    return value if isinstance(value, str) and value else None


def modify_in_process(path: Path, kinds: tuple[str, ...], caption: str) -> None:
    """Set ``caption`` in the metadata ``kinds`` of ``path``, in place."""
    pyexiv2 = require()
    image = pyexiv2.Image(str(path))
    try:
        if "xmp" in kinds:
            image.modify_xmp({DESCRIPTION: {X_DEFAULT: caption}})
        if "exif" in kinds:
            image.modify_exif({"Exif.Image.ImageDescription": caption})
        if "iptc" in kinds:
            image.modify_iptc({"Iptc.Application2.Caption": caption})
    finally:
        image.close()


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """One request's answer; an exception becomes an error answer, never the worker's end."""
    try:
        op = request.get("op")
        path = Path(request["path"])
        if op == "read":
            return {"value": read_in_process(path)}
        if op == "modify":
            modify_in_process(path, tuple(request["kinds"]), str(request["caption"]))
            return {}
        return {"error": "ValueError", "message": f"unknown op {op!r}"}
    except OSError as e:
        return {
            "error": "OSError",
            "message": str(e),
            "errno": e.errno,
            "strerror": e.strerror,
            "filename": None if e.filename is None else str(e.filename),
        }
    except MetadataUnavailable as e:
        return {"error": "MetadataUnavailable", "message": str(e)}
    except Exception as e:  # exiv2 raises RuntimeError; anything else is reported the same way
        return {"error": type(e).__name__, "message": str(e)}


def serve(requests: BinaryIO, answers: BinaryIO, handler: Handler = handle) -> None:
    """Answer requests until stdin closes (the parent exited or let this worker go)."""
    worker_protocol.serve(requests, answers, handler)


def main(handler: Handler = handle) -> None:
    # The answers get a private copy of stdout, and fd 1 becomes stderr: whatever exiv2 or a
    # library prints then lands in the log, never in the middle of an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers, handler)


if __name__ == "__main__":
    main()
