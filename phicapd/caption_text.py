"""What a caption's text may be before anything stores it: one cleaning function and one check.

Every caption, from every backend (the native engine, a remote server, a test fake) and for
both lanes, passes ``checked_caption`` once, in the scheduler's delivery, before any output is
written or a client is answered: the .txt, the JSON sidecar, the manifest, the XMP sidecar, the
embedded description, the journal and the socket reply then all hold the same text.

* **Too long: refused, not cut** (``caption_too_long``). A caption may hold at most the tokens
  that were asked for (``max_new_tokens``). The native engine stops there by construction; a
  server that answers more ignores ``max_tokens``, so its text is not what the model was asked
  to say, and phicapd has no tokenizer on the remote side to cut it at the right place (a cut
  by characters would store a caption that ends mid-word as a success). The check is the token
  count the backend reports and, because a server may under-report it, a character bound of
  ``MAX_CHARS_PER_TOKEN`` per token, far above what any real token decodes to. (The remote
  backend also reads its reply with a byte cap derived from the same bound, so a huge reply
  is refused before it is buffered: ``phicapd.remote.chat_api``.)
* **Cleaned** (``clean_caption``): the text is for .txt, JSON, XMP and IPTC, which all take a
  line break but none of which wants a control character (XML 1.0 cannot even hold most of
  them; exiv2 cuts a description at a NUL). Line breaks are kept (as ``\\n``), every other
  control or format-breaking character is removed, tabs and other spaces become one space,
  spaces around line breaks go and at most one blank line is kept.
* **Blank after cleaning** (``caption_empty``): a failure, retried and then parked like any
  other, never a sidecar that ``skip`` would keep for ever.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import replace

from phicapd.captioner import Caption
from phicapd.errors import CAPTION_EMPTY, CAPTION_TOO_LONG, CaptionError

#: The most characters one token may stand for. Phi-3.5-vision's longest tokens decode to about
#: 16 characters; twice that never refuses a real caption and still refuses a runaway one.
MAX_CHARS_PER_TOKEN = 32

#: Line breaks of every spelling, read as one ``\n``.
_LINE_BREAKS = re.compile(r"\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
#: Runs of horizontal whitespace (after control characters are gone), read as one space.
_SPACES = re.compile(r"[^\S\n]+")
#: Two or more blank lines, read as one.
_BLANK_LINES = re.compile(r"\n{3,}")
#: Not characters at all to XML 1.0 (the XMP packet), so never stored.
_NONCHARACTERS = frozenset("\ufffe\uffff")


def clean_caption(text: str, strip_openers: Sequence[str] = ()) -> str:
    """``text`` as every output stores it: control characters removed, whitespace normalised,
    a boilerplate opener such as "The image features" dropped.

    Kept: ``\\n`` (between lines; ``\\r\\n``, ``\\r`` and Unicode's line separators become it).
    Removed: every other C0/C1 control (NUL, BEL, BS, ESC, DEL, ...) and lone surrogates (a
    server's JSON can carry them, and no UTF-8 file can). Tabs and other spaces become one
    space; each line is trimmed; at most one blank line in a row. The opener is removed only at
    the very start (case-insensitive) and the next word is capitalised, so "The image features
    a cat on a mat." becomes "A cat on a mat.".
    """
    lines = _lines(text)
    # Lines are kept: a root's ``single_line`` is its own form of the caption (``caption_form``).
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    return _strip_opener(text, strip_openers)


def _lines(text: str) -> list[str]:
    """The text's lines, each without control characters and with its spaces normalised."""
    text = _LINE_BREAKS.sub("\n", text)
    text = "".join(c for c in text if c == "\n" or c.isspace() or _printable(c))
    return [_SPACES.sub(" ", line).strip() for line in text.split("\n")]


def _printable(char: str) -> bool:
    return unicodedata.category(char) not in ("Cc", "Cs") and char not in _NONCHARACTERS


def _strip_opener(text: str, strip_openers: Sequence[str]) -> str:
    lowered = text.lower()
    for opener in strip_openers:
        if opener and lowered.startswith(opener.lower()):
            rest = text[len(opener) :].lstrip(" ,:;-")
            if rest:
                text = rest[0].upper() + rest[1:]
            break
    return text


def checked_caption(
    caption: Caption, *, max_new_tokens: int, strip_openers: Sequence[str] = (), name: str = "request"
) -> Caption | CaptionError:
    """``caption`` with its text cleaned, or the error that refuses it (``caption_too_long``,
    ``caption_empty``; both retryable). ``name`` (the image's path) goes into the message."""
    if caption.new_tokens > max_new_tokens or len(caption.text) > max_new_tokens * MAX_CHARS_PER_TOKEN:
        return CaptionError(
            f"{name}: the model returned more than the {max_new_tokens} tokens asked for"
            f" ({caption.new_tokens} tokens, {len(caption.text)} characters); not stored",
            code=CAPTION_TOO_LONG,
        )
    text = clean_caption(caption.text, strip_openers)
    if not text:
        return CaptionError(f"{name}: the model returned an empty caption", code=CAPTION_EMPTY, retryable=True)
    return caption if text == caption.text else replace(caption, text=text)
