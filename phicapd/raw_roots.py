"""Camera raw files and roots that embed captions: a raw file's caption goes to its XMP sidecar
(and ``.txt``/``.json`` if asked), never into the raw file itself.

Why ``embed`` is refused for raw files: a raw file is the original that raw workflows never
rewrite. Lightroom, Camera Raw, digiKam and darktable all keep their edits and descriptions of
proprietary raws in XMP sidecars (Lightroom writes into DNG only), and an embed rewrites the whole
file (tens of megabytes per caption), through exiv2, inside a maker's container whose maker notes
the maker's own software may then no longer read.

So a ``[[watch]]`` root that writes ``embed`` must not take raw files:

* its own ``include`` patterns matching a raw extension (``*``, ``*.NEF``, ``DSC_*``) are a
  configuration error naming the root and the fix (``raw_patterns``, ``check_embedding_roots``);
* its default ``include`` (no patterns given) leaves raw files out, so a configuration that
  embeds keeps working when rawpy is installed; the raw files such a root passes over are
  counted with the unreadable ones (``pipeline.unreadable``), so the user hears of them.

phicapctl refuses a raw file whose root (or ``[sidecar] formats``, outside every root) embeds,
before it asks the model (``control.batch``; code ``errors.EMBED_RAW_REFUSED``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from phicapd import image_types

if TYPE_CHECKING:
    from phicapd.config import Settings, WatchRoot


def _tokens(pattern: str) -> list[str]:
    """``pattern`` as ``fnmatch`` reads it: ``*``, ``?``, a ``[...]`` class or one literal character."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j < n:  # a closed class; an unclosed "[" is a literal, as in fnmatch
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
        out.append(pattern[i])
        i += 1
    return out


def _matches_char(char: str, token: str) -> bool:
    # As ``pipeline.paths`` matches include patterns: translated, without regard to case.
    return re.fullmatch(fnmatch.translate(token), char, re.IGNORECASE) is not None


def takes_extension(pattern: str, extension: str) -> bool:
    """Whether ``pattern`` (an ``include`` pattern, matched against file names without regard to
    case) matches some file name ending in ``extension``: read from the pattern's end, its
    tokens must match the extension's characters until a ``*`` takes the rest."""
    if "/" in pattern:
        return False  # include patterns match file names, which hold no "/"
    tokens = _tokens(pattern)
    for char in reversed(extension):
        if not tokens:
            return False
        token = tokens.pop()
        if token == "*":
            return True
        if not _matches_char(char, token):
            return False
    return True  # whatever tokens are left match some name before the extension


def raw_patterns(patterns: Iterable[str]) -> list[tuple[str, str]]:
    """The patterns of ``patterns`` that take camera raw files, each with one raw extension it takes."""
    out: list[tuple[str, str]] = []
    for pattern in patterns:
        extension = next((e for e in image_types.RAW_EXTENSIONS if takes_extension(pattern, e)), None)
        if extension is not None:
            out.append((pattern, extension))
    return out


def default_include(*, raw: bool = True) -> list[str]:
    """A root's default ``include``: the extensions this install decodes (``raw=False``: no raws)."""
    return [f"*{e}" for e in image_types.default_extensions(raw=raw)]


def check_embedding_roots(settings: Settings) -> None:
    """Keep raw files out of every root that embeds captions (see the module docstring):
    ``ValueError`` for a root whose own patterns take them; a default ``include`` without them."""
    for i, root in enumerate(settings.watch):
        if "embed" not in settings.formats_for(root):
            continue
        if "include" not in root.model_fields_set:
            root.include = default_include(raw=False)
            continue
        taken = raw_patterns(root.include)
        if taken:
            shown = ", ".join(f"{p!r} (takes {e})" for p, e in taken)
            formats = "its formats" if root.formats is not None else "[sidecar] formats"
            raise ValueError(
                f'watch[{i}] ({root.path}): {formats} include "embed", which cannot write into camera raw '
                f"files, and its include patterns take them: {shown}. Caption raw files into XMP sidecars: "
                f'narrow include to the types embed writes (e.g. ["*.jpg", "*.jpeg", "*.png", "*.tif", '
                f'"*.tiff", "*.webp"]) and watch the raw files in a root of their own with formats = ["xmp"], '
                f'or write ["xmp"] instead of "embed" here'
            )


def raws_left_out(settings: Settings, root: WatchRoot) -> frozenset[str]:
    """The raw extensions ``root`` would decode but leaves out because it embeds (its default
    ``include`` without raw files): its scans count those files with the unreadable ones."""
    embeds = "embed" in settings.formats_for(root)
    if embeds and image_types.raw_available() and root.include == default_include(raw=False):
        return frozenset(image_types.RAW_EXTENSIONS)
    return frozenset()
