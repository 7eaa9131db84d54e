"""The reference ``Phi3VProcessor`` call, for one prompt with any number of images.

The captioner builds its batches itself; this is the drop-in equivalent of
``processor(prompt, images)`` for parity checks and scripts: same ids (per-chunk BOS, ``-N``
placeholders), same ``pixel_values`` layout (``num_crops + 1`` slots, zero padded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from phicapd.model.processing import collate_images, preprocess_image
from phicapd.model.tokenizer import Phi3VTokenizer


@dataclass(frozen=True)
class Phi3VProcessor:
    tokenizer: Phi3VTokenizer
    num_crops: int

    @classmethod
    def from_dir(cls, model_dir: Path, num_crops: int | None = None) -> Phi3VProcessor:
        """``num_crops`` defaults to the checkpoint's preprocessor_config.json (4 for Phi-3.5)."""
        if num_crops is None:
            config_path = model_dir / "preprocessor_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            num_crops = int(config.get("num_crops", 1))
        return cls(Phi3VTokenizer.from_dir(model_dir), num_crops)

    def __call__(self, prompt: str, images: Sequence[Image.Image] = ()) -> dict[str, torch.Tensor]:
        ids: list[int]
        out: dict[str, torch.Tensor] = {}
        if images:
            batch = collate_images([preprocess_image(im, self.num_crops) for im in images], slots=self.num_crops + 1)
            ids = self.tokenizer.encode_prompt(prompt, batch.num_tokens)
            out = {"pixel_values": batch.pixel_values, "image_sizes": batch.image_sizes}
        else:
            ids = self.tokenizer.encode_prompt(prompt, [])
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **out}
