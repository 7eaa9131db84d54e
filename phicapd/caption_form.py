"""A root's form of a caption: its prefix and suffix, and one line where ``single_line`` asks.

The model's text is cleaned once for everyone (``caption_text``); what a root then writes is
its own form of it, made here and nowhere else: the daemon's writer and ``phicapctl
caption-file`` / ``caption-dir`` (whose reply the daemon forms for the root that owns the file)
both call ``root_form``.

The journal keeps the text as it was *written* (form included), as it already did for prefix
and suffix: every check of "does this output still hold our own caption?" (a hand edit,
``existing = "skip"``'s caption of older bytes, a rename's or a deletion's own outputs)
compares a file with that text, and a form re-derived from the root's *current* settings would
call every output written before a change of them edited.

A change of ``single_line`` is a change of settings like prefix or suffix: it is part of the
settings key (``outputs.provenance.settings_key``, only when true, so no existing key changes),
so ``phicapctl stale`` lists the captions written the other way and ``restale`` redoes them.
Turning it **on** needs no model: one line is a function of the journal's text, so such a
caption is *re-formed* (``reformable``): staged from the journal and forced through every
output, like a backfill that replaces (``jobs.NewWork.reform``). Turning it **off** cannot be
done from the journal (the line breaks are gone): those captions go back to the model.
"""

from __future__ import annotations

from phicapd.captioner import decorate
from phicapd.config import WatchRoot


def one_line(text: str) -> str:
    """``text`` on one line: its lines (any line break, ``str.splitlines``), each trimmed, the
    blank ones dropped, joined by one space."""
    return " ".join(stripped for line in text.splitlines() if (stripped := line.strip()))


def root_form(text: str, root: WatchRoot) -> str:
    """What ``root`` writes for the model's (cleaned) ``text``: prefix, text, suffix, and all
    of it on one line when the root is ``single_line`` (a prefix's line break included)."""
    decorated = decorate(text, root.prefix, root.suffix)
    return one_line(decorated) if root.single_line else decorated


def reformable(root: WatchRoot, caption_key: str | None, unformed_key: str) -> bool:
    """Whether a caption keyed ``caption_key`` can be put into ``root``'s form from the journal
    alone: the root is ``single_line`` and the caption differs from its current settings in
    that only (``unformed_key``: the root's key with ``single_line`` off)."""
    return root.single_line and caption_key is not None and caption_key == unformed_key
