"""Prompt text and token ids, as the reference Phi3VProcessor builds them (phi3v.md §5).

We drive the checkpoint's ``tokenizer.json`` with the ``tokenizers`` library directly: its
normalizer, added tokens and BOS post-processor are exactly what the reference's fast
tokenizer runs, independent of how a given transformers release rebuilds Llama tokenizers.
Each text chunk between image tags is tokenised on its own, with its own BOS; image N becomes
a run of ``-N`` placeholders that the model overwrites with image features.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from phicapd.errors import ConfigError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
END_OF_TURN = "<|end|>"
END_OF_TEXT = "<|endoftext|>"
ASSISTANT = "<|assistant|>"


def build_prompt(user_text: str, num_images: int = 1) -> str:
    """The chat-template rendering of one user turn: image tags first, one per line (model card)."""
    tags = "".join(f"<|image_{i}|>\n" for i in range(1, num_images + 1))
    return f"<|user|>\n{tags}{user_text}<|end|>\n<|assistant|>\n"


def _token_content(value: object) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Phi3VTokenizer:
    """Per-chunk tokenisation, special-token ids and decoding for one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, special: dict[str, str | None], add_bos: bool) -> None:
        self._tok = tokenizer
        self.bos_id = self._required(special.get("bos_token") or "<s>")
        self.end_id = self._required(END_OF_TURN)
        self.eos_id = self._required(special.get("eos_token") or END_OF_TEXT)
        self.pad_id = self._required(special.get("pad_token") or special.get("eos_token") or END_OF_TEXT)
        self.assistant_id = self._tok.token_to_id(ASSISTANT)
        self._add_bos = add_bos
        # Whether tokenizer.json's post-processor already adds BOS (the real one does).
        self._auto_bos = self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    @classmethod
    def from_dir(cls, model_dir: Path) -> Phi3VTokenizer:
        path = model_dir / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ConfigError(f"cannot load {path}: {e}") from None
        config: dict = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {cfg_path}: {e}") from None
        special = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(tok, special, add_bos=bool(config.get("add_bos_token", True)))

    def _required(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"tokenizer has no {token!r} token; is this a Phi-3-vision tokenizer?")
        return token_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation ends on end-of-turn, end-of-text, or a new assistant turn (32007, 32000,
        32001: the stop set of the reference harnesses, phi3v.md "Generation"); a model that
        starts a second turn instead of ending its first must not caption the rest of it."""
        ids = {self.end_id, self.eos_id}
        if self.assistant_id is not None:
            ids.add(self.assistant_id)
        return frozenset(ids)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_chunk(self, text: str) -> list[int]:
        """One text chunk with the tokenizer's special tokens: a leading BOS."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self._add_bos and not self._auto_bos:
            ids = [self.bos_id, *ids]
        return ids

    def encode_prompt(self, prompt: str, image_tokens: Sequence[int]) -> list[int]:
        """Token ids for a prompt with ``<|image_N|>`` tags; image N gets ``image_tokens[N-1]`` x ``-N``.

        Tags must be 1, 2, ... in order: the model fills the k-th run of placeholders with the
        k-th image, so an out-of-order tag would silently attach the wrong image.
        """
        tags = [int(m.group(1)) for m in IMAGE_TAG.finditer(prompt)]
        if tags != list(range(1, len(image_tokens) + 1)):
            raise ValueError(f"prompt has image tags {tags}, expected 1..{len(image_tokens)} in order")
        ids: list[int] = []
        for i, chunk in enumerate(IMAGE_TAG.split(prompt)[::2]):
            ids += self.encode_chunk(chunk)
            if i < len(image_tokens):
                ids += [-(i + 1)] * image_tokens[i]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
