"""The decode worker: the child process in which watched images and uploaded bytes are read and
decoded (``decode_pool`` starts and supervises it).

Pillow's decoders and LibRaw (camera raw files, ``raw_decode``) are C code fed with files anyone
may drop into a watched directory. In the daemon's own process a file that crashes one would
take the service down at every start until systemd's start limit gave up on it; here a crash or
a hang costs this process, which the daemon replaces, and the file fails on its own
(``image_crashed_decoder``).

Started as ``python -m phicapd.pipeline.decode_worker FD MAX_FILE_BYTES MAX_PIXELS``: ``FD`` is
the shared buffer (``decode_buffer``), the others the ``[imaging]`` limits. Protocol: one JSON
object per line on stdin, one answer per line on stdout, in order (as ``exiv2_worker``).

* ``{"op": "file", "path": P, "min_age_seconds": S}``: read and decode the file ->
  ``{"width": W, "height": H, "sha256": ..., "size": ..., "mtime_ns": ..., "inode": ...}``
  (what was read, for the fingerprint), its 8-bit RGB pixels in the buffer's first W*H*3 bytes.
* ``{"op": "bytes", "size": N, "name": NAME}``: decode the N bytes the daemon put in the buffer
  -> ``{"width": W, "height": H}``, the pixels in the buffer as above.
* an error: ``{"error": "ImageError", "code": ..., "message": ..., "retryable": ...}``, or
  ``{"error": <type>, "message": ...}`` for anything else.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from phicapd.errors import ImageError
from phicapd.imaging import decode_image, decode_read, read_file
from phicapd.outputs.worker_protocol import Handler, serve
from phicapd.pipeline.decode_buffer import SharedPixels


@dataclass(frozen=True, slots=True)
class Limits:
    """The ``[imaging]`` limits ``imaging`` reads (as ``ImagingSettings``, whose pydantic import
    would cost every worker's start a few tenths of a second)."""

    max_file_bytes: int
    max_pixels: int


class Decoder:
    """Answers requests against one shared buffer and the daemon's ``[imaging]`` limits."""

    def __init__(self, pixels: SharedPixels, settings: Limits) -> None:
        self.pixels = pixels
        self.settings = settings

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request's answer; an exception becomes an error answer, never the worker's end."""
        try:
            op = request.get("op")
            if op == "file":
                path = Path(request["path"])
                data, st = read_file(path, self.settings.max_file_bytes)
                min_age = float(request.get("min_age_seconds", 0))
                image = decode_read(data, path, st.st_mtime, self.settings, min_age_seconds=min_age)
                answer = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "inode": st.st_ino,
                }
            elif op == "bytes":
                with self.pixels.view(int(request["size"])) as view:
                    data = bytes(view)
                image = decode_image(data, name=str(request["name"]), settings=self.settings)
                answer = {}
            else:
                return {"error": "ValueError", "message": f"unknown op {op!r}"}
            del data
            raw = _rgb_bytes(image)
            with self.pixels.view(len(raw)) as view:
                view[:] = raw
            return {**answer, "width": image.width, "height": image.height}
        except ImageError as e:
            return {"error": "ImageError", "code": e.code, "message": str(e), "retryable": e.retryable}
        except Exception as e:
            return {"error": type(e).__name__, "message": str(e)}


def _rgb_bytes(image: Image.Image) -> bytes:
    """The pixels, 3 bytes each, rows top to bottom: ``tobytes`` in one block. Pillow encodes
    in blocks of ``ImageFile.MAXBLOCK`` (64 KiB) and joins them, which doubles the cost of a
    large photo's bytes (12 MP: 50 ms, in one block 24 ms); this process does nothing else."""
    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, image.width * image.height * 3 + 1)
    return image.tobytes()


def main(handler: Callable[[Decoder], Handler] = lambda d: d.handle) -> None:
    """``handler``: what answers, given the decoder (the tests wrap it to crash on purpose)."""
    fd, max_file_bytes, max_pixels = (int(a) for a in sys.argv[1:4])
    decoder = Decoder(SharedPixels(fd), Limits(max_file_bytes, max_pixels))
    # As in the exiv2 worker: answers on a private copy of stdout, fd 1 becomes stderr, so what a
    # library prints lands in the log, never in the middle of an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers, handler(decoder))


if __name__ == "__main__":
    main()
