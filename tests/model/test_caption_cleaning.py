"""The native engine's captions are cleaned by the same function as a server's (issue 18, item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from phicapd.caption_text import clean_caption
from tests.model.helpers import make_captioner
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import write_unique_png

#: What a model could decode to: an opener, control characters, a CRLF, a tab and trailing spaces.
RAW = "The image features\x00 a tiny\x07 model\x08 on\x1b a mat.\r\nIts second\t line.  \n"


def test_the_native_path_goes_through_the_same_cleaning(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = make_captioner(tiny_checkpoint, max_batch=2, max_new_tokens=8)
    monkeypatch.setattr(captioner.tokenizer, "decode", lambda ids: RAW)
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_new_tokens = 8\n")
    with running_daemon(settings, captioner):
        write_unique_png(root / "a.png", 1)
        wait_for(lambda: (root / "a.txt").exists(), 30, "the sidecar")
    expected = "A tiny model on a mat.\nIts second line."
    assert clean_caption(RAW, settings.model.strip_openers) == expected
    assert (root / "a.txt").read_text() == expected + "\n"
