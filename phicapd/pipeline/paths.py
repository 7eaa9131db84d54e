"""Which files are images to caption: one filter shared by the watcher and the scans."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.pipeline.sidecar import TEMP_MARKER

# Partial downloads and editor/rsync temp files. rsync writes ".name.XXXXXX" (hidden, so the
# dot rule covers it); browsers and download tools use these suffixes.
_PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", ".swx", "~")
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")


def is_ignored_name(name: str) -> bool:
    """Hidden, temporary and partial names never trigger work."""
    lowered = name.lower()
    return (
        name.startswith(".")
        or lowered.endswith(_PARTIAL_SUFFIXES)
        or TEMP_MARKER in name
        or bool(_RSYNC_TEMP.match(name))
    )


def _matches(name: str, patterns: list[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns)


def is_candidate(path: Path, root: WatchRoot) -> bool:
    """True when ``path`` (a file under ``root.path``) is an image this root should caption."""
    try:
        rel = path.relative_to(root.path)
    except ValueError:
        return False
    parts = rel.parts
    if not parts:
        return False
    if not root.recursive and len(parts) > 1:
        return False
    # A hidden directory anywhere below the root hides everything in it.
    if any(p.startswith(".") for p in parts):
        return False
    name = parts[-1]
    if is_ignored_name(name) or not _matches(name, root.include):
        return False
    rel_posix = rel.as_posix()
    return not any(fnmatch.fnmatchcase(rel_posix, p) or fnmatch.fnmatchcase(name, p) for p in root.ignore)


def is_watched_dir(path: Path, root: WatchRoot) -> bool:
    """True for ``root.path`` itself and, when recursive, its non-hidden subdirectories."""
    try:
        rel = path.relative_to(root.path)
    except ValueError:
        return False
    if not rel.parts:
        return True
    return root.recursive and not any(p.startswith(".") for p in rel.parts)


def list_images(directory: Path, root: WatchRoot) -> list[str]:
    """Names of the images in ``directory`` that ``root`` captions (input to the sidecar naming rule)."""
    try:
        with os.scandir(directory) as it:
            return [e.name for e in it if is_candidate(Path(e.path), root)]
    except OSError:
        return []
