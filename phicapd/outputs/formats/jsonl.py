"""``jsonl``: ``metadata.jsonl`` per directory in Hugging Face ``imagefolder`` layout, one
``{"file_name": ..., "text": ...}`` line per image of that directory, sorted by file name.

It is rewritten whole (temp file + rename) once per writer group, so a reader never sees half of
it, and an image no longer on disk drops out at the directory's next rewrite.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phicapd.config import MANIFEST_NAME
from phicapd.fsnames import is_utf8
from phicapd.outputs import safe_files
from phicapd.outputs.atomic import write_atomic
from phicapd.outputs.formats import Existing, Format, Stage, register


def read_manifest(directory: Path) -> dict[str, str]:
    """``metadata.jsonl`` of ``directory``: file name -> text. Lines that are not an entry (a
    person's edit gone wrong) are dropped at the next rewrite rather than failing it. A manifest
    that is not a regular file or is over ``safe_files.MANIFEST_MAX_BYTES`` raises
    ``safe_files.RefusedFile`` (never a blocked or unbounded read)."""
    entries: dict[str, str] = {}
    try:
        text = safe_files.read_text(directory / MANIFEST_NAME, safe_files.MANIFEST_MAX_BYTES, errors="replace")
    except FileNotFoundError:
        return entries
    lines = text.splitlines()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            name, text = entry.get("file_name"), entry.get("text")
            if isinstance(name, str) and isinstance(text, str):
                entries[name] = text
    return entries


def update_manifest(directory: Path, captions: Mapping[str, str | None]) -> None:
    """Rewrite ``directory``'s ``metadata.jsonl`` with ``captions`` (file name -> text; None
    removes the entry) merged in, and every entry whose image is gone dropped.

    The writer thread and the moves (``pipeline.moves``) call this; one lock makes each
    read-merge-rewrite whole, so neither loses the other's entries. A manifest
    that is not a regular file (a pipe, a link) or is too large is refused, never replaced
    (``safe_files.RefusedFile``).
    """
    with _MANIFEST_LOCK:
        _update_manifest(directory, captions)


_MANIFEST_LOCK = threading.Lock()


def _update_manifest(directory: Path, captions: Mapping[str, str | None]) -> None:
    entries = read_manifest(directory)
    before = dict(entries)
    for name, text in captions.items():
        if text is None:
            entries.pop(name, None)
        else:
            entries[name] = text
    # A name that is not UTF-8 cannot be a JSON text ``file_name``: the writer parks such an
    # image (``name_not_utf8``) rather than fail the manifest of its whole directory.
    kept = {n: t for n, t in entries.items() if is_utf8(n) and os.path.lexists(directory / n)}
    if kept == before and (kept or not (directory / MANIFEST_NAME).exists()):
        return  # nothing to change (a removal of a file the manifest never listed)
    lines = [json.dumps({"file_name": name, "text": kept[name]}, ensure_ascii=False) for name in sorted(kept)]
    write_atomic(directory / MANIFEST_NAME, "".join(line + "\n" for line in lines))


@dataclass(frozen=True, slots=True)
class Manifest:
    """A directory's ``metadata.jsonl`` as the scans see it: who it lists, and when it changed."""

    names: frozenset[str]
    mtime_ns: int | None

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest as it is now. Parsed once per version of the file: the decode pool asks
        for every job of a directory whose manifest may list 100,000 images, and the writer
        replaces it (a new inode) at most once per group. One that cannot be read (a named pipe,
        over its cap: ``safe_files``) lists nobody; the writer reports it when it rewrites it."""
        try:
            st = (directory / MANIFEST_NAME).stat()
            return _parsed_manifest(directory, st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return cls(frozenset(), None)


@functools.lru_cache(maxsize=8)
def _parsed_manifest(directory: Path, mtime_ns: int, size: int, inode: int) -> Manifest:
    return Manifest(frozenset(read_manifest(directory)), mtime_ns)


class Jsonl(Format):
    """``skip`` keeps the image's entry while the manifest is at least as new as the image,
    ``only-missing`` whenever it is listed."""

    name = "jsonl"
    primary_rank = 4
    stage = Stage.DIRECTORY

    def kept(self, e: Existing) -> bool:
        entries = e.manifest()
        listed = e.image.name in entries.names
        return listed and (e.policy == "only-missing" or (entries.mtime_ns or 0) >= e.changed_ns)

    def present(self, e: Existing) -> bool:
        return e.image.name in e.manifest().names


register(Jsonl())
