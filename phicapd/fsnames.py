"""File names are bytes: how a name that is not UTF-8 travels where only text fits.

Linux allows any bytes but ``/`` and NUL in a name. Python hands such a name over as a ``str``
with lone surrogates (``os.fsdecode``, the ``surrogateescape`` error handler: byte 0xff becomes
U+DCFF), and that ``str`` is what every ``Path`` inside phicapd holds. It cannot be encoded as
UTF-8, so each place that leaves Python as text picks one of these, all reversible but
``display``:

- ``journal_text``: the journal's TEXT columns. A valid UTF-8 name is stored as it is (so rows
  written before this existed read back unchanged); each escaped byte becomes NUL and two hex
  digits. No real name holds NUL, so the escaped form never equals another name, and SQLite
  compares TEXT bytewise, so equality, uniqueness and ranges stay right.
- the socket protocol carries names as JSON strings in which a byte that is not UTF-8 is the
  lone-surrogate escape ``\\udcXX`` (Python's ``json`` reads and writes it; see
  ``control.protocol``), so a name round-trips through phicapctl unchanged.
- ``display``: for humans (logs, errors, tables): such a byte reads as ``\\xff``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPED = re.compile("[\udc80-\udcff]")
_JOURNAL_ESCAPE = re.compile("\x00([0-9a-f]{2})")


def is_utf8(name: str | os.PathLike[str]) -> bool:
    """True when the name's bytes are valid UTF-8 (it holds no surrogate escapes)."""
    return _ESCAPED.search(os.fspath(name)) is None


def journal_text(value: str | os.PathLike[str]) -> str:
    """A path or name as the journal stores it (see the module docstring)."""
    text = os.fspath(value)
    if is_utf8(text):
        return text
    return _ESCAPED.sub(lambda m: f"\x00{ord(m.group()) - 0xDC00:02x}", text)


def from_journal_text(text: str) -> str:
    """The inverse of ``journal_text``."""
    if "\x00" not in text:
        return text
    return _JOURNAL_ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def journal_path(text: str) -> Path:
    return Path(from_journal_text(text))


def display(value: str | os.PathLike[str]) -> str:
    """A name for people to read: bytes that are not UTF-8 as ``\\xNN``; always encodable."""
    text = os.fspath(value)
    if is_utf8(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
