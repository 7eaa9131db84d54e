"""``Phi3VProcessor`` for ``trust_remote_code`` runtimes (vLLM), over phicapd's own image transform.

Loaded from a checkpoint directory by ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)``
(``preprocessor_config.json``'s ``auto_map``). It gives what the reference processor gives
(phi3v.md §3 and §5), which is what vLLM's Phi3V reads:

* ``img_tokens``: the placeholder strings ``<|image_1|>``, ``<|image_2|>``, ...;
* ``calc_num_image_tokens_from_image_size(width, height)``: the image-token count of a raw size;
* ``__call__(text=..., images=...)``: ``input_ids`` (each text chunk between image tags tokenized on
  its own, BOS included; image N as ``-N`` repeated its token count), ``attention_mask``,
  ``pixel_values`` float32 [n, num_crops + 1, 3, 336, 336] (global view first, zero padding) and
  ``image_sizes`` [n, 2] = the padded HD size (P, Q).

The pixel arithmetic is ``phicapd_processing.py`` beside this file: a verbatim copy of
``phicapd/model/processing.py``, so vLLM and phicapd's native engine see the same crops.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from .phicapd_processing import (
    CLIP_MEAN,
    CLIP_STD,
    collate_images,
    num_image_tokens_for_size,
    preprocess_image,
)

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
#: More placeholders than any prompt holds (vLLM indexes this list by image number).
MAX_IMAGES = 1024


class Phi3VImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes"]

    def __init__(self, num_crops: int = 1, num_img_tokens: int = 144, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(CLIP_MEAN)
        self.image_std = list(CLIP_STD)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return num_image_tokens_for_size(width, height, self.num_crops)

    def preprocess(self, images: Any, num_crops: int | None = None, **_: Any) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        crops = self.num_crops if num_crops is None else num_crops
        processed = [preprocess_image(im, crops) for im in images]
        batch = collate_images(processed, slots=crops + 1)
        return BatchFeature(
            {
                "pixel_values": batch.pixel_values,
                "image_sizes": batch.image_sizes,
                "num_img_tokens": batch.num_tokens,
            }
        )


class Phi3VProcessor(ProcessorMixin):
    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: Any) -> None:
        super().__init__(image_processor, tokenizer)
        self.img_tokens = [f"<|image_{i}|>" for i in range(1, MAX_IMAGES + 1)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Phi3VProcessor:
        """The tokenizer and the image processor of a local checkpoint; ``num_crops`` overrides the
        checkpoint's (vLLM passes ``mm_processor_kwargs`` here)."""
        directory = os.fspath(pretrained_model_name_or_path)
        with open(os.path.join(directory, "preprocessor_config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        num_crops = int(kwargs.get("num_crops", config.get("num_crops", 1)))
        image_processor = Phi3VImageProcessor(num_crops=num_crops, num_img_tokens=config.get("num_img_tokens", 144))
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        return cls(image_processor, tokenizer)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def __call__(
        self, text: str | list[str] | None = None, images: Any = None, return_tensors: Any = "pt", **kwargs: Any
    ) -> BatchFeature:
        if isinstance(text, list):
            if len(text) != 1:
                raise ValueError("the Phi-3-vision processor takes one prompt at a time")
            text = text[0]
        text = text or ""
        if images is None or (isinstance(images, list) and not images):
            ids = self.tokenizer(text).input_ids
            return BatchFeature({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))})
        image_inputs = self.image_processor.preprocess(images, num_crops=kwargs.get("num_crops"))
        counts = image_inputs.pop("num_img_tokens")
        tags = [int(n) for n in IMAGE_TAG.findall(text)]
        if sorted(set(tags)) != list(range(1, len(counts) + 1)):
            raise ValueError(f"the prompt's image tags {tags} do not number the {len(counts)} images 1..n")
        ids: list[int] = []
        chunks = IMAGE_TAG.split(text)[::2]
        for i, chunk in enumerate(chunks):
            ids += self.tokenizer(chunk).input_ids  # each chunk with its own BOS, as the reference
            if i < len(tags):
                ids += [-tags[i]] * counts[tags[i] - 1]
        input_ids = torch.tensor([ids], dtype=torch.long)
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": image_inputs["pixel_values"],
                "image_sizes": image_inputs["image_sizes"],
            }
        )
