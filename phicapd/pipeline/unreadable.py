"""Image files a root holds that no installed decoder reads, so that the user hears of them.

A root's ``include`` takes only what can be decoded (``image_types``); a camera's raw files
without rawpy or HEIC photos without pillow-heif are then silently not captioned, and so are raw
files in a root that embeds captions (``raw_roots``: its default ``include`` leaves them out).
Each full scan of a root counts the files it passes over whose extension names such a type
(``image_types.unreadable_extensions``, and for such a root ``raw_roots.raws_left_out``) and
keeps, per root, the count and one example path: ``phicapctl status`` shows them
(``unreadable``), and the log says so once per root (again only after a scan found none).
"""

from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phicapd import image_types
from phicapd.config import WatchRoot
from phicapd.log import get_logger
from phicapd.pipeline.paths import is_ignored_name

log = get_logger(__name__)

_HINT = (
    "HEIC/HEIF: pip install 'phicapd[heic]'; camera raw files: pip install 'phicapd[raw]', and caption them "
    'in a root that does not embed (formats = ["xmp"]: embed cannot write into raw files)'
)


@dataclass(slots=True)
class Tally:
    """What one scan of ``root`` passed over: the files of an unreadable type, and the first one
    met. Hidden and temporary names, and those the root's ``ignore`` names, are not counted: the
    user has said they are not wanted."""

    extensions: frozenset[str]
    root: WatchRoot
    files: int = 0
    example: Path | None = None
    by_extension: dict[str, int] = field(default_factory=dict)

    def note(self, directory: Path, name: str) -> None:
        """A file the scan does not take; counted if its type is an image no decoder reads."""
        extension = os.path.splitext(name)[1].lower()
        if extension not in self.extensions or is_ignored_name(name):
            return
        path = directory / name
        rel = path.relative_to(self.root.path).as_posix()
        if any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in self.root.ignore):
            return
        self.files += 1
        self.by_extension[extension] = self.by_extension.get(extension, 0) + 1
        if self.example is None:
            self.example = path


class UnreadableFiles:
    """Per root, the tally of its last full scan (thread-safe: scans of roots run in parallel)."""

    def __init__(self, extensions: frozenset[str] | None = None) -> None:
        self.extensions = image_types.unreadable_extensions() if extensions is None else extensions
        self._lock = threading.Lock()
        self._by_root: dict[Path, Tally] = {}

    def tally(self, root: WatchRoot, also: frozenset[str] = frozenset()) -> Tally:
        """A new tally for a scan of ``root``; ``also``: extensions it counts besides (``raw_roots``)."""
        return Tally(self.extensions | also, root)

    def record(self, root: Path, tally: Tally) -> None:
        """The result of a full scan of ``root``; logs a warning when the root starts holding such
        files (the first scan that finds any, or the first after one that found none)."""
        with self._lock:
            before = self._by_root.get(root)
            if tally.files:
                self._by_root[root] = tally
            else:
                self._by_root.pop(root, None)
        if tally.files and before is None:
            log.warning(
                "a root holds image files no installed decoder reads; they are not captioned",
                root=str(root),
                files=tally.files,
                by_extension=dict(sorted(tally.by_extension.items())),
                example=str(tally.example),
                hint=_HINT,
            )

    def report(self, roots: list[Path]) -> list[dict[str, Any]]:
        """``status``'s ``unreadable``: one record per root of ``roots`` (those watched now)
        holding such files."""
        with self._lock:
            tallies = sorted((root, t) for root, t in self._by_root.items() if root in roots)
        return [
            {
                "root": str(root),
                "files": t.files,
                "by_extension": dict(sorted(t.by_extension.items())),
                "example": str(t.example),
            }
            for root, t in tallies
        ]
