"""Prompt format and per-chunk tokenisation (phi3v.md §5) on the tiny checkpoint's tokenizer."""

from __future__ import annotations

import json

import pytest

from phicapd.model.tokenizer import Phi3VTokenizer, build_prompt


def test_prompt_format_matches_the_chat_template():
    assert build_prompt("Describe this image.") == "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"
    assert build_prompt("Q", 2) == "<|user|>\n<|image_1|>\n<|image_2|>\nQ<|end|>\n<|assistant|>\n"


def test_every_chunk_starts_with_bos(tiny_tokenizer: Phi3VTokenizer):
    tok = tiny_tokenizer
    ids = tok.encode_prompt(build_prompt("Describe this image."), [757])
    space, newline = tok.token_id("▁"), tok.token_id("<0x0A>")
    user, end, assistant = tok.token_id("<|user|>"), tok.token_id("<|end|>"), tok.token_id("<|assistant|>")
    # Same structure as the verified reference ids:
    # [1, 32010, 29871, 13, (-1 x 757), 1, 29871, 13, ..., 32007, 29871, 13, 32001]
    assert ids[:4] == [tok.bos_id, user, space, newline]
    assert ids[4 : 4 + 757] == [-1] * 757
    assert ids[761:764] == [tok.bos_id, space, newline]
    assert ids[-4:] == [end, space, newline, assistant]  # <|assistant|> swallows the final "\n"
    assert ids.count(tok.bos_id) == 2
    assert tok.decode(ids[764:-4]) == "Describe this image."


def test_two_images_give_three_bos_and_numbered_placeholders(tiny_tokenizer: Phi3VTokenizer):
    ids = tiny_tokenizer.encode_prompt(build_prompt("Compare.", 2), [313, 625])
    assert ids.count(tiny_tokenizer.bos_id) == 3
    assert ids.count(-1) == 313 and ids.count(-2) == 625
    assert ids.index(-2) > max(i for i, t in enumerate(ids) if t == -1)


def test_image_tags_must_match_the_images_in_order(tiny_tokenizer: Phi3VTokenizer):
    with pytest.raises(ValueError, match="image tags"):
        tiny_tokenizer.encode_prompt("<|image_2|>\n<|image_1|>\nQ", [313, 313])
    with pytest.raises(ValueError, match="image tags"):
        tiny_tokenizer.encode_prompt(build_prompt("Q"), [313, 313])


def test_special_token_ids_come_from_the_tokenizer(tiny_checkpoint, tiny_tokenizer: Phi3VTokenizer):
    raw = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in raw["added_tokens"]}
    assert tiny_tokenizer.stop_ids == {added["<|end|>"], added["<|endoftext|>"], added["<|assistant|>"]}
    assert tiny_tokenizer.pad_id == added["<|endoftext|>"]
    assert tiny_tokenizer.bos_id == added["<s>"] == 1
    # The tiny vocabulary is small, so nothing may assume Microsoft's 32000+ ids.
    assert max(added.values()) < 32000
    assert len(tiny_tokenizer) == max(added.values()) + 1


def test_decode_drops_special_tokens(tiny_tokenizer: Phi3VTokenizer):
    ids = tiny_tokenizer.encode_chunk("the cat<|end|>")
    assert tiny_tokenizer.decode(ids) == "the cat"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode_chunk("héllo ✓")) == "héllo ✓"  # byte fallback
