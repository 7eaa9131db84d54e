"""Which files are images to caption: one filter shared by the watcher and the scans."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path

from phicapd.config import WatchRoot
from phicapd.outputs.atomic import TEMP_MARKER

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


@functools.lru_cache(maxsize=256)
def _compile(patterns: tuple[str, ...], fold_case: bool) -> re.Pattern[str] | None:
    if not patterns:
        return None
    flags = re.IGNORECASE if fold_case else 0
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), flags)


def is_candidate_name(name: str, rel_posix: str, root: WatchRoot) -> bool:
    if is_ignored_name(name):
        return False
    include = _compile(tuple(root.include), True)
    if include is None or not include.match(name):
        return False
    ignore = _compile(tuple(root.ignore), False)
    return ignore is None or not (ignore.match(rel_posix) or ignore.match(name))


def is_candidate(path: Path, root: WatchRoot) -> bool:
    """True when ``path`` (a file under ``root.path``) is an image this root should caption.

    Include patterns match the file name case-insensitively; ignore patterns match the path
    relative to the root or the file name.
    """
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
    if any(p.startswith(".") for p in parts[:-1]):
        return False
    return is_candidate_name(parts[-1], rel.as_posix(), root)


def is_watched_dir(path: Path, root: WatchRoot) -> bool:
    """True for ``root.path`` itself and, when recursive, its non-hidden subdirectories."""
    try:
        rel = path.relative_to(root.path)
    except ValueError:
        return False
    return _watches(rel, root)


def _watches(rel: Path, root: WatchRoot) -> bool:
    """Does ``root`` watch its subdirectory ``rel`` (``.`` for the root itself)?"""
    if not rel.parts:
        return True
    return root.recursive and not any(p.startswith(".") for p in rel.parts)


def list_images(directory: Path, root: WatchRoot) -> list[str]:
    """Names of the images in ``directory`` that ``root`` captions (input to the sidecar naming rule)."""
    if not is_watched_dir(directory, root):
        return []
    rel_dir = directory.relative_to(root.path).as_posix()
    prefix = "" if rel_dir == "." else rel_dir + "/"
    try:
        with os.scandir(directory) as it:
            return [e.name for e in it if is_candidate_name(e.name, prefix + e.name, root)]
    except OSError:
        return []


def journal_path(path: Path, root: WatchRoot) -> Path:
    """``path``, which ``root`` owns (``owning_root``), in the form the watcher and the journal
    give it: below the root as configured. A client resolves the directory, so a file under a
    symlinked root arrives in its resolved form."""
    if is_watched_dir(path.parent, root):
        return path
    try:
        return root.path / path.relative_to(os.path.realpath(root.path))
    except ValueError:
        return path


def owning_root(path: Path, roots: Iterable[WatchRoot]) -> WatchRoot | None:
    """The root whose configuration applies to the image ``path``, or None.

    ``path`` is absolute and its directory resolved (phicapctl sends it so; the file itself may be
    a symlink, whose sidecar still goes beside the link). A root owns the file when it watches the
    file's directory (``is_watched_dir``: not a subdirectory of a non-recursive root, not inside
    a hidden directory), matched against the root as configured and as resolved (a symlinked
    root). Nested roots: the deepest one wins. Only root paths are resolved; ``path`` itself is
    never touched on disk.
    """
    best: WatchRoot | None = None
    best_depth = -1
    for root in roots:
        # realpath, not Path.resolve: it never raises (a symlink loop just fails to match).
        for base in (root.path, Path(os.path.realpath(root.path))):
            try:
                rel = path.parent.relative_to(base)
            except ValueError:
                continue
            if _watches(rel, root) and len(base.parts) > best_depth:
                best, best_depth = root, len(base.parts)
    return best
