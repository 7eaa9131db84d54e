"""``Phi3VCaptioner``: the native model behind the daemon's ``Captioner`` seam.

A batch of images of any sizes becomes one left-padded prompt batch (each request with its own
prompt and token budget), one prefill and one decode loop. Greedy by default; sampling when
configured. Captions are decoded without special tokens and cleaned of boilerplate openers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from phicapd.captioner import Caption, CaptionRequest, clean_caption
from phicapd.config import ModelSettings
from phicapd.errors import CaptionError, ConfigError
from phicapd.model.generation import SamplingConfig, generate
from phicapd.model.loading import load_from_settings
from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.processing import ProcessedImage, collate_images, preprocess_image
from phicapd.model.tokenizer import IMAGE_TAG, Phi3VTokenizer, build_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded model inputs for a batch of single-image requests."""

    input_ids: torch.Tensor  # [B, L] with -1 placeholders for image tokens, pad on the left
    attention_mask: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor


def build_batch(tokenizer: Phi3VTokenizer, images: Sequence[ProcessedImage], prompts: Sequence[str]) -> PromptBatch:
    """Tokenise each request's chat prompt and left-pad them to one batch."""
    if len(images) != len(prompts):
        raise ValueError("one prompt per image")
    rows = [
        tokenizer.encode_prompt(build_prompt(prompt), [image.num_tokens])
        for image, prompt in zip(images, prompts, strict=True)
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    pixels = collate_images(images)
    return PromptBatch(input_ids, attention_mask, pixels.pixel_values, pixels.image_sizes)


class Phi3VCaptioner:
    """Captions batches of images with a loaded Phi-3.5-vision model. One thread at a time."""

    def __init__(
        self,
        model: Phi3VForCausalLM,
        tokenizer: Phi3VTokenizer,
        settings: ModelSettings,
        identity: str,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self._identity = identity
        self._lock = threading.Lock()
        self._closed = False

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    @property
    def sampling(self) -> SamplingConfig:
        s = self.settings
        return SamplingConfig(do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p)

    def prepare(self, image: Image.Image) -> ProcessedImage:
        """CPU-side preprocessing; safe to call from other threads ahead of ``caption``."""
        return preprocess_image(image, self.settings.num_crops)

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        if not batch:
            return []
        for req in batch:
            if IMAGE_TAG.search(req.prompt):
                raise CaptionError(
                    "prompt must not contain <|image_N|> tags", code="caption_bad_prompt", retryable=False
                )
        try:
            images = [self.prepare(req.image) for req in batch]
            with self._lock, torch.inference_mode():
                if self._closed:
                    raise CaptionError("the model has been closed", code="model_closed", retryable=False)
                token_lists = self._generate(images, batch)
        except CaptionError:
            raise
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise CaptionError(f"GPU out of memory on a batch of {len(batch)}: {e}", code="model_out_of_memory") from e
        except (RuntimeError, ValueError, OSError) as e:
            raise CaptionError(f"captioning failed: {e}") from e
        return [
            Caption(text=clean_caption(self.tokenizer.decode(ids), self.settings.strip_openers), new_tokens=len(ids))
            for ids in token_lists
        ]

    def _generate(self, images: list[ProcessedImage], batch: Sequence[CaptionRequest]) -> list[list[int]]:
        inputs = build_batch(self.tokenizer, images, [req.prompt for req in batch])
        device = self.model.device
        input_ids = inputs.input_ids.to(device)
        embeds = self.model.embed(input_ids, inputs.pixel_values, inputs.image_sizes)
        return generate(
            self.model.language_model,
            embeds,
            inputs.attention_mask.to(device),
            max_new_tokens=[req.max_new_tokens for req in batch],
            stop_ids=self.tokenizer.stop_ids,
            pad_id=self.tokenizer.pad_id,
            sampling=self.sampling,
        )

    def warm_up(self) -> None:
        """One tiny caption so that kernels, allocator and caches are ready before READY=1."""
        image = Image.new("RGB", (64, 48), (127, 127, 127))
        self.caption([CaptionRequest(image=image, prompt="Describe this image.", max_new_tokens=2)])

    def describe(self) -> dict[str, Any]:
        """A small status summary: device, dtype, parameter count, GPU memory."""
        if self._closed:
            return {"identity": self.identity, "closed": True}
        info: dict[str, Any] = {
            "identity": self.identity,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attn_implementation": self.model.language_model.config._attn_implementation,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "num_crops": self.settings.num_crops,
        }
        if self.model.device.type == "cuda":
            index = self.model.device.index or 0
            info["gpu"] = torch.cuda.get_device_name(index)
            info["gpu_memory_allocated"] = torch.cuda.memory_allocated(index)
            info["gpu_memory_reserved"] = torch.cuda.memory_reserved(index)
        return info

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            del self.model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _identity(settings: ModelSettings, model_dir: Path) -> str:
    if settings.path is not None:
        return str(model_dir)
    return f"{settings.id}@{settings.revision}"


def load_captioner(settings: ModelSettings) -> Phi3VCaptioner:
    """Load the configured checkpoint and tokenizer; raise ``ConfigError``/``PhicapError`` if unusable."""
    model, model_dir = load_from_settings(settings)
    tokenizer = Phi3VTokenizer.from_dir(model_dir)
    vocab = model.config.text.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
    log.info("loaded %s on %s (%s)", model_dir, model.device, model.dtype)
    return Phi3VCaptioner(model, tokenizer, settings, _identity(settings, model_dir))
