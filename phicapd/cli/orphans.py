"""``phicapctl orphans [DIR]``: the outputs whose image is gone, from the files alone.

It needs no daemon (it reads the directories with the caller's permissions): an output is a
``NAME.txt`` (the ``[sidecar] extension``), a ``NAME.json`` that phicapd wrote (it holds a
``caption``; another tool's JSON is no output), or a ``NAME.xmp``. Its image is gone when no
other file of its directory is one the naming rule (``outputs.naming``) could have given it:
none whose stem or full name is ``NAME``, nor ``NAME`` = its full name plus ``.N``. Files of any
type count, so a raw file the root does not caption still owns its ``.xmp``. A deleted image's
``metadata.jsonl`` entry is no file: the daemon drops it at the directory's next rewrite.

Without DIR, every ``[[watch]]`` root of the configuration (``--config``, ``$PHICAPD_CONFIG``, the
system file) is looked through. One path per line, names that are not UTF-8 as ``\\xNN``
(``fsnames.display``), as the other commands print them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from phicapd.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, JSON_EXTENSION, MANIFEST_NAME, Settings, load_settings
from phicapd.control.batch import EX_NOINPUT, EX_OK
from phicapd.errors import ConfigError
from phicapd.fsnames import display
from phicapd.outputs.atomic import is_temp_name
from phicapd.outputs.formats.json import read_json_caption
from phicapd.outputs.metadata import XMP_EXTENSION


def find_orphans(top: Path, extension: str, recursive: bool = True) -> Iterator[Path]:
    """The outputs below ``top`` whose image is gone, directory by directory, sorted."""
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue  # unreadable, or gone meanwhile: nothing of it can be listed
        names: list[str] = []
        subdirs: list[Path] = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and not entry.name.startswith("."):
                        subdirs.append(Path(entry.path))
                elif not is_temp_name(entry.name):
                    names.append(entry.name)
            except OSError:
                continue
        yield from _orphans_in(directory, names, (extension, JSON_EXTENSION, XMP_EXTENSION))
        stack.extend(sorted(subdirs, reverse=True))


def _orphans_in(directory: Path, names: list[str], extensions: tuple[str, ...]) -> Iterator[Path]:
    outputs = [n for n in names if n.endswith(extensions) and not n.startswith(".")]
    others = set(names).difference(outputs, {MANIFEST_NAME})
    stems = {os.path.splitext(n)[0] for n in others}
    for name in sorted(outputs):
        extension = next(e for e in extensions if name.endswith(e))
        base = name[: -len(extension)]
        if not base or _owned(base, others, stems):
            continue
        path = directory / name
        if extension == JSON_EXTENSION and read_json_caption(path) is None:
            continue  # not a caption of phicapd's
        yield path


def _owned(base: str, names: set[str], stems: set[str]) -> bool:
    """Could the naming rule give a file of ``names`` the sidecar base ``base``?"""
    if base in stems or base in names:
        return True
    head, _, n = base.rpartition(".")
    return head in names and n.isascii() and n.isdigit() and n[0] != "0" and int(n) >= 2


def _settings(config: Path | None) -> Settings | None:
    """The daemon's configuration, where this user can read one; None when there is none."""
    if config is None and (named := os.environ.get(CONFIG_ENV)):
        config = Path(named)
    if config is not None:
        return load_settings(config)
    if os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        return load_settings(DEFAULT_CONFIG_PATH)
    return None


def orphans(directory: Path | None, config: Path | None) -> list[Path]:
    """What ``phicapctl orphans`` lists; ``ConfigError`` when there is nothing to look through."""
    settings = _settings(config)
    if directory is not None:
        extension = settings.sidecar.extension if settings is not None else ".txt"
        return list(find_orphans(directory.absolute(), extension))
    if settings is None or not settings.watch:
        raise ConfigError("no watched roots in the configuration: name a DIR, or the daemon's file with --config")
    return [p for root in settings.watch for p in find_orphans(root.path, settings.sidecar.extension, root.recursive)]


def cmd_orphans(client: object, args: argparse.Namespace) -> int:
    """phicapctl's command (``client`` unused: the files are the truth, the daemon is not asked)."""
    try:
        found = orphans(args.directory, args.config)
    except ConfigError as e:
        print(f"phicapctl: {display(str(e))}", file=sys.stderr)
        return EX_NOINPUT
    for path in found:
        print(display(path))
    return EX_OK
