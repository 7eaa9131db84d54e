"""``caption_text``: what a caption may be before anything stores it (issue 18, item 5)."""

from __future__ import annotations

import pytest

from phicapd.caption_text import MAX_CHARS_PER_TOKEN, checked_caption, clean_caption
from phicapd.captioner import Caption
from phicapd.errors import CaptionError


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A cat\x00 on\x07 a\x08 mat\x1b[0m.", "A cat on a mat[0m."),  # NUL, BEL, BS, ESC
        ("A cat\x7f\x9b on a mat.", "A cat on a mat."),  # DEL and a C1 control
        ("  A cat\t\ton   a\u00a0mat.  ", "A cat on a mat."),  # tabs, runs of spaces, a no-break space
        ("First.\r\nSecond.\rThird.\u2028Fourth.", "First.\nSecond.\nThird.\nFourth."),  # every line break
        ("One.  \n\n\n\n  Two.\n", "One.\n\nTwo."),  # at most one blank line, lines trimmed
        ("A lone \ud800surrogate\ufffe.", "A lone surrogate."),  # not storable as UTF-8 or in XML
        ("Un chat \U0001f408\u200d\u2b1b sur le tapis.", "Un chat \U0001f408\u200d\u2b1b sur le tapis."),
        ("\x00\x07 \x1b\n\t", ""),
    ],
)
def test_control_characters_go_and_whitespace_is_normalised(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean
    assert clean_caption(clean) == clean  # idempotent: cleaning a clean caption changes nothing
    clean.encode("utf-8")  # storable


def test_an_opener_is_dropped_after_cleaning() -> None:
    assert clean_caption("\x1bThe image features\x00 a cat.", ["The image features"]) == "A cat."
    assert clean_caption("The image features", ["The image features"]) == "The image features"


def test_a_caption_longer_than_asked_for_is_refused_not_cut() -> None:
    by_tokens = checked_caption(Caption("A cat on a mat.", 50), max_new_tokens=4, name="/p/a.png")
    assert isinstance(by_tokens, CaptionError) and by_tokens.code == "caption_too_long"
    assert "/p/a.png" in str(by_tokens) and by_tokens.retryable
    # A server may under-report its tokens: the text itself is bounded too.
    by_text = checked_caption(Caption("A" * (4 * MAX_CHARS_PER_TOKEN + 1), 4), max_new_tokens=4)
    assert isinstance(by_text, CaptionError) and by_text.code == "caption_too_long"
    fits = Caption("A" * (4 * MAX_CHARS_PER_TOKEN), 4)
    assert checked_caption(fits, max_new_tokens=4) is fits


def test_blank_after_cleaning_is_caption_empty_and_a_clean_caption_keeps_its_provenance() -> None:
    blank = checked_caption(Caption("\x00 \x1b\t\r\n", 3), max_new_tokens=40)
    assert isinstance(blank, CaptionError) and blank.code == "caption_empty" and blank.retryable
    cleaned = checked_caption(
        Caption("A\x00 cat.", 3, backend="openai", endpoint="http://e/v1", model="m"), max_new_tokens=40
    )
    assert cleaned == Caption("A cat.", 3, backend="openai", endpoint="http://e/v1", model="m")
