"""The exiv2 worker: the child process in which every pyexiv2 call runs (``metadata`` starts it).

exiv2 is C++ with a long history of crashes and endless loops on crafted files; in the daemon's
own process one such file would take the service down, and the start-up scan would meet it again
after every restart. Here a crash or a hang costs only this process, which the parent replaces.

Protocol: one JSON object per line on stdin, one answer per line on stdout, in order.

* ``{"op": "read", "path": P, "max_bytes": N}`` -> ``{"value": <the first description or null>,
  "values": [every description, each once]}`` (``read_in_process``: XMP ``dc:description`` in any
  language, EXIF ``ImageDescription``, IPTC ``Caption-Abstract``; camera placeholders left out)
* ``{"op": "modify", "path": P, "kinds": ["xmp", "exif", "iptc"], "caption": C, "max_bytes": N}``
  -> ``{}`` (``max_bytes``: the cap of the file's kind; ``safe_files.IMAGE_MAX_BYTES`` if left out)
* an error: ``{"error": "OSError" | "RuntimeError" | "MetadataUnavailable" | "MetadataUnreadable" |
  <type>, "message": ...}`` (an ``OSError`` also with ``errno``, ``strerror`` and ``filename``;
  ``MetadataUnreadable``: exiv2 cannot parse the file to modify, e.g. a malformed XMP sidecar)

Only the parsing and the in-place edit happen here: the parent copies, fsyncs and renames.
exiv2 opens paths itself, so the worker checks each one first (``safe_files``): a request names
a regular file of at most ``max_bytes`` (``metadata``'s cap for its kind), never a pipe that
blocks the open or a device that reads without end. A ``read`` hands exiv2 the very file it
checked (``/proc/self/fd/N``, not the path again); a ``modify`` names the parent's own temp copy,
never a link.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from phicapd.metadata_library import MetadataUnavailable
from phicapd.metadata_library import require_pyexiv2 as require
from phicapd.outputs import safe_files, worker_protocol
from phicapd.outputs.makernotes import MAKER_NOTE, exif_rewritable
from phicapd.outputs.metadata import DESCRIPTION, X_DEFAULT, MetadataUnreadable
from phicapd.outputs.placeholders import is_placeholder
from phicapd.outputs.worker_protocol import Handler

#: Where an image or sidecar holds a description, in the order ``read``'s ``value`` prefers them.
EXIF_DESCRIPTION = "Exif.Image.ImageDescription"
IPTC_CAPTION = "Iptc.Application2.Caption"


def read_in_process(path: Path) -> list[str]:
    """Every description ``path`` holds, each text once: XMP ``dc:description`` (x-default
    first, then every other language), EXIF ``ImageDescription``, IPTC ``Caption-Abstract``.
    Camera placeholders and blank padding are no description (``placeholders``); a file exiv2
    cannot open or parse has none."""
    pyexiv2 = require()
    try:
        image = pyexiv2.Image(str(path))
    except (OSError, RuntimeError):
        return []
    texts: list[object] = []
    try:
        try:
            value = image.read_xmp().get(DESCRIPTION)
        except RuntimeError:
            value = None
        if isinstance(value, dict):
            texts.append(value.get(X_DEFAULT))
            texts.extend(v for k, v in value.items() if k != X_DEFAULT)
        else:
            texts.append(value)
        texts.append(_read_text(image.read_exif, EXIF_DESCRIPTION))
        texts.append(_read_text(image.read_iptc, IPTC_CAPTION))
    finally:
        image.close()
    out: list[str] = []
    for text in texts:
        if isinstance(text, str) and not is_placeholder(text) and text not in out:
            out.append(text)
    return out


def _read_text(read: Callable[..., dict[str, Any]], key: str) -> object:
    """``key`` of one of pyexiv2's readers, as UTF-8, else Latin-1: EXIF ASCII and IPTC without a
    character set declared are often written in the camera's or the tool's legacy encoding."""
    for encoding in ("utf-8", "latin-1"):
        try:
            return read(encoding=encoding).get(key)
        except UnicodeDecodeError:
            continue
        except RuntimeError:
            return None
    return None


def read_checked(path: Path, max_bytes: int) -> list[str]:
    """``read_in_process`` of ``path`` if it is a regular file of at most ``max_bytes`` (a link
    to one included); anything else holds no description."""
    try:
        fd, _ = safe_files.open_regular(path, max_bytes)
    except OSError:
        return []
    try:
        # The descriptor's own path: exiv2 opens the file checked, whatever ``path`` is by now.
        return read_in_process(Path(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else path)
    finally:
        os.close(fd)


def modify_in_process(path: Path, kinds: tuple[str, ...], caption: str) -> None:
    """Set ``caption`` in the metadata ``kinds`` of ``path``, in place; ``MetadataUnreadable``
    when exiv2 cannot parse the file (it is opened, parsed whole, before anything changes).
    EXIF is left as it is where rewriting it would break a maker note (``makernotes``)."""
    pyexiv2 = require()
    try:
        image = pyexiv2.Image(str(path))
    except RuntimeError as e:
        if not path.exists():  # exiv2 says so with a RuntimeError too
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path)) from None
        raise MetadataUnreadable(str(e)) from None
    try:
        if "exif" in kinds and not exif_rewritable(_exif_keys(image)):
            kinds = tuple(k for k in kinds if k != "exif")
        if "xmp" in kinds:
            image.modify_xmp({DESCRIPTION: {X_DEFAULT: caption}})
        if "exif" in kinds:
            image.modify_exif({"Exif.Image.ImageDescription": caption})
        if "iptc" in kinds:
            image.modify_iptc({"Iptc.Application2.Caption": caption})
    finally:
        image.close()


def _exif_keys(image: Any) -> frozenset[str]:
    """The EXIF keys exiv2 finds in ``image`` (latin-1 decodes every byte, so no text fails)."""
    try:
        return frozenset(image.read_exif(encoding="latin-1"))
    except RuntimeError:  # EXIF it cannot list is EXIF it must not rewrite
        return frozenset({MAKER_NOTE})


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """One request's answer; an exception becomes an error answer, never the worker's end."""
    try:
        op = request.get("op")
        path = Path(request["path"])
        max_bytes = int(request.get("max_bytes", safe_files.IMAGE_MAX_BYTES))
        if op == "read":
            values = read_checked(path, max_bytes)
            return {"value": values[0] if values else None, "values": values}
        if op == "modify":
            os.close(safe_files.open_regular(path, max_bytes, follow=False)[0])  # our temp copy, still
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
