"""``Phi3VCaptioner``: the native model behind the daemon's ``Captioner`` seam.

Images of any sizes (each request with its own prompt and token budget) go through the
static-cache engine (``engine.py``): continuous batching over as many KV-cache slots as fit.
``caption(batch)`` runs a fixed batch; ``stream(take, deliver)`` keeps the engine running while
work keeps coming, taking new requests into free slots between decode steps and answering each
as soon as it is done. Greedy by default; sampling when configured. Captions are decoded without
special tokens and cleaned of boilerplate openers. A GPU out-of-memory error is survived: the
engine retries with fewer rows per batch, then (``caption``) with fewer crops per image, and
only then fails.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from phicapd.captioner import Caption, CaptionRequest, Deliver, Take
from phicapd.config import ModelSettings
from phicapd.errors import CaptionError, ConfigError, PhicapError
from phicapd.model.engine import EngineRequest, GenerationEngine
from phicapd.model.generation import SamplingConfig
from phicapd.model.loading import load_from_settings
from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.processing import CROP, ProcessedImage, collate_images, num_image_tokens, preprocess_image
from phicapd.model.tokenizer import IMAGE_TAG, Phi3VTokenizer, build_prompt

log = logging.getLogger(__name__)

# Default rows per step ([model] max_batch unset). On a GPU a decode step mostly reads the
# weights and every row's KV cache, so the weights' share per image falls with more rows: by
# the engine issue's H100 figures (5.9 ms/step at 1 row, 15.3 at 32) 32 rows are needed for
# 10 images/s at num_crops 16. On the CPU a step is compute-bound and saturates near 16.
GPU_MAX_BATCH = 32
CPU_MAX_BATCH = 16


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

    #: New requests join the running rows between decode steps (``stream``).
    continuous_batching = True
    #: Once the crops are made, a held image is cut down to at most this longest side: it is only
    #: needed again for a retry with fewer crops (``caption``'s out-of-memory fallback).
    kept_image_side = 2048

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
        self._typical_ctx: int | None = None
        self._crop_dtype = model.vision_tower.dtype
        cuda = model.device.type == "cuda"
        self._pin = cuda  # crops in page-locked memory: an asynchronous copy in the prefill
        self._max_batch = settings.max_batch or (GPU_MAX_BATCH if cuda else CPU_MAX_BATCH)
        self.engine = GenerationEngine(model, max_slots=self._max_batch, compile=cuda and settings.compile)

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def sampling(self) -> SamplingConfig:
        s = self.settings
        return SamplingConfig(do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p)

    def prepare(self, image: Image.Image) -> ProcessedImage:
        """CPU-side preprocessing; safe to call from other threads ahead of ``caption``."""
        return self._preprocess(image, self.settings.num_crops)

    def _preprocess(self, image: Image.Image, num_crops: int) -> ProcessedImage:
        # The crops in the vision tower's dtype already: CLIP casts its input to its weights'
        # dtype first thing, so this is the same rounding, done off the GPU thread, and bf16
        # halves what the GPU thread concatenates and copies to the device.
        return preprocess_image(image, num_crops, self._crop_dtype, pin_memory=self._pin)

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        if not batch:
            return []
        for req in batch:
            self._check_prompt(req)
        try:
            images = [self._prepared(req) for req in batch]
            with self._lock, torch.inference_mode():
                self._check_open()
                self.engine.regrow()
                token_lists = self._generate_surviving_oom(images, batch)
        except CaptionError:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            raise _caption_error(e) from e
        return [self._caption_of(ids) for ids in token_lists]

    def stream(self, take: Take, deliver: Deliver) -> None:
        """Caption what ``take`` hands over, continuously, until it has nothing more.

        New requests join the running rows between decode steps, so one that arrives mid-batch
        waits for one step and its own prefill, not for the batch. A request whose prompt and
        budget outgrow the cache rows is held until the running rows finish, then runs with
        longer rows. On out-of-memory the rows in flight start again with fewer slots; when
        there is nothing left to shrink this raises, and the caller retries the requests it
        never got back one at a time (``caption`` also has fewer crops to fall back on).
        """
        feed = _CaptionFeed(self, take, deliver)
        typical = self.typical_ctx()
        base_ctx = self.engine.ctx_for(typical)
        with self._lock, torch.inference_mode():
            self._check_open()
            while True:
                self.engine.regrow()
                feed.ctx = max(base_ctx, feed.ctx_needed())
                oom = False
                try:
                    self.engine.run(feed, feed.ctx, self.tokenizer.stop_ids, self.sampling, typical_ctx=typical)
                except torch.OutOfMemoryError:
                    oom = True  # recover outside the handler: the traceback pins the failed step's tensors
                except (RuntimeError, ValueError, OSError) as e:
                    raise _caption_error(e) from e
                if oom:
                    self.engine.release()
                    shrunk = self.engine.shrink()
                    action = f"retrying with at most {self.engine.max_slots} rows" if shrunk else "gave up"
                    if self.engine.last_oom is not None:
                        self.engine.last_oom.action = action
                    log.warning("GPU out of memory with %d rows in flight: %s", len(feed.in_flight), action)
                    if not shrunk:
                        raise CaptionError("GPU out of memory even with one row", code="model_out_of_memory")
                    feed.restart_in_flight()
                elif not feed.held and not self.engine.regrow_due():
                    return  # else: a run that drained for ``regrow``, or held requests, go on

    def _check_prompt(self, req: CaptionRequest) -> None:
        if IMAGE_TAG.search(req.prompt):
            raise CaptionError("prompt must not contain <|image_N|> tags", code="caption_bad_prompt", retryable=False)

    def _check_open(self) -> None:
        if self._closed:
            raise CaptionError("the model has been closed", code="model_closed", retryable=False)

    def _caption_of(self, ids: list[int]) -> Caption:
        # Cleaned (and its openers stripped) by the scheduler, as every backend's captions are.
        return Caption(text=self.tokenizer.decode(ids), new_tokens=len(ids))

    def _encode(self, req: CaptionRequest, image: ProcessedImage) -> EngineRequest:
        ids = self.tokenizer.encode_prompt(build_prompt(req.prompt), [image.num_tokens])
        return EngineRequest(ids, image, req.max_new_tokens, tag=req)

    def _prepared(self, req: CaptionRequest) -> ProcessedImage:
        """The request's HD crops: done ahead by the scheduler's decode pool if it set ``prepared``."""
        prepared = req.prepared
        return prepared if isinstance(prepared, ProcessedImage) else self.prepare(req.image)

    def _requests(self, images: Sequence[ProcessedImage], batch: Sequence[CaptionRequest]) -> list[EngineRequest]:
        return [self._encode(req, im) for im, req in zip(images, batch, strict=True)]

    def _generate(self, images: list[ProcessedImage], batch: Sequence[CaptionRequest]) -> list[list[int]]:
        return self.engine.generate(
            self._requests(images, batch), self.tokenizer.stop_ids, self.sampling, typical_ctx=self.typical_ctx()
        )

    def _generate_surviving_oom(self, images: list[ProcessedImage], batch: Sequence[CaptionRequest]) -> list[list[int]]:
        """Generate; on out-of-memory halve the rows per batch, then the crops per image, then give up."""
        num_crops = self.settings.num_crops
        while True:
            oom = False
            try:
                return self._generate(images, batch)
            except torch.OutOfMemoryError:
                oom = True  # recover outside the handler: the traceback pins the failed step's tensors
            assert oom
            self.engine.release()
            if self.engine.shrink():
                e = self.engine
                action = f"retrying with at most {e.max_slots} rows per batch, {e.prefill_tokens} prefill tokens"
            elif num_crops > 1:
                num_crops //= 2
                images = [self._preprocess(req.image, num_crops) for req in batch]
                action = f"retrying with num_crops {num_crops}"
            else:
                action = "gave up"
            if self.engine.last_oom is not None:
                self.engine.last_oom.action = action
            log.warning("GPU out of memory on a batch of %d: %s", len(batch), action)
            if action == "gave up":
                raise CaptionError(
                    f"GPU out of memory on a batch of {len(batch)} even with one row and one crop",
                    code="model_out_of_memory",
                )

    def typical_ctx(self) -> int:
        """Cache length for the configured prompt, the largest image at num_crops and the token budget."""
        if self._typical_ctx is None:  # asked on every batch and stream: tokenize the prompt once
            n = self.settings.num_crops
            largest = max(num_image_tokens(h * CROP, (n // h) * CROP) for h in range(1, n + 1))
            prompt = len(self.tokenizer.encode_prompt(build_prompt(self.settings.prompt), [largest]))
            self._typical_ctx = prompt + self.settings.max_new_tokens
        return self._typical_ctx

    def warm_up(self) -> None:
        """Before READY=1: size the KV pool, capture the decode graphs, run one tiny caption."""
        with self._lock, torch.inference_mode():
            self.engine.warm_up(self.engine.ctx_for(self.typical_ctx()), self.max_batch)
        # Through ``stream``, the path the daemon uses, so it runs in the cache just warmed up
        # (``caption`` would size a small one for it and capture, or compile, graphs for that).
        pending = [CaptionRequest(Image.new("RGB", (64, 48), (127, 127, 127)), "Describe this image.", 2)]
        failures: list[PhicapError] = []

        def take(room: int, idle: bool) -> list[CaptionRequest]:
            return [pending.pop() for _ in range(min(room, len(pending)))]

        def deliver(request: CaptionRequest, outcome: Caption | PhicapError) -> None:
            if isinstance(outcome, PhicapError):
                failures.append(outcome)

        self.stream(take, deliver)
        if failures:
            raise failures[0]

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
            "engine": self.engine.describe(),
        }
        if self.model.device.type == "cuda":
            index = self.model.device.index or 0
            info["gpu"] = {
                "name": torch.cuda.get_device_name(index),
                "memory_allocated_bytes": torch.cuda.memory_allocated(index),
                "memory_reserved_bytes": torch.cuda.memory_reserved(index),
                "memory_total_bytes": torch.cuda.get_device_properties(index).total_memory,
            }
        return info

    @property
    def waiting(self) -> str | None:
        """Never: a local model is always there to take work."""
        return None

    def stopping(self) -> None:
        """Nothing to let go: every request taken is running on the GPU, and the drain finishes it."""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.engine.release()
            del self.engine, self.model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class _CaptionFeed:
    """The engine's ``Feed`` for ``Phi3VCaptioner.stream``: caption requests in, captions out."""

    def __init__(self, captioner: Phi3VCaptioner, take: Take, deliver: Deliver) -> None:
        self.captioner = captioner
        self._take = take
        self._deliver = deliver
        self.ctx = 0  # the current run's row length
        self.held: collections.deque[EngineRequest] = collections.deque()  # to (re)start before new work
        self.in_flight: dict[int, EngineRequest] = {}  # handed to the engine, not done; by id()

    def ctx_needed(self) -> int:
        engine = self.captioner.engine
        return max((engine.ctx_for(len(r.input_ids) + r.max_new_tokens) for r in self.held), default=0)

    def restart_in_flight(self) -> None:
        """After an out-of-memory error: everything that was running starts again, first."""
        self.held.extendleft(reversed(list(self.in_flight.values())))
        self.in_flight.clear()

    def take(self, room: int, *, idle: bool) -> list[EngineRequest]:
        if self.captioner.engine.regrow_due():
            room = 0  # let the rows drain: the run ends and the next one has its limits back
        fits = self.captioner.engine.fits
        out: list[EngineRequest] = []
        while self.held and len(out) < room and fits(self.held[0], self.ctx):
            out.append(self.held.popleft())
        if not self.held:
            # Asked even with no room: the caller's take doubles as a per-step heartbeat.
            for req in self._take(room - len(out), idle and not out):
                request = self._encode(req)
                if request is None:
                    continue
                if fits(request, self.ctx):
                    out.append(request)
                else:  # too long for these rows: the run drains, and the next has longer ones
                    self.held.append(request)
        self.in_flight.update((id(r), r) for r in out)
        return out

    def done(self, request: EngineRequest, tokens: list[int]) -> None:
        del self.in_flight[id(request)]
        self._deliver(request.tag, self.captioner._caption_of(tokens))

    def _encode(self, req: CaptionRequest) -> EngineRequest | None:
        """The engine request, or None after delivering the error that rules this one out."""
        try:
            self.captioner._check_prompt(req)
            return self.captioner._encode(req, self.captioner._prepared(req))
        except PhicapError as e:
            self._deliver(req, e)
        except (RuntimeError, ValueError, OSError) as e:
            self._deliver(req, CaptionError(f"cannot prepare the image: {e}"))
        return None


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


# CUDA errors after which the context is unusable until the process restarts (the "sticky"
# ones); others, such as a cuBLAS allocation failure under memory pressure, are not.
_STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ecc",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "launch timed out",
    "an illegal address",
    "cuda error: unknown error",
)


def _caption_error(e: Exception) -> CaptionError:
    """A sticky device fault leaves the CUDA context unusable until the process restarts,
    whatever image comes next: ``model_broken`` tells the scheduler so. Anything else
    (out-of-memory included) is a failure of this batch."""
    message = str(e).lower()
    if "cuda" in message and any(sticky in message for sticky in _STICKY_CUDA_ERRORS):
        return CaptionError(f"the GPU failed: {e}", code="model_broken")
    return CaptionError(f"captioning failed: {e}")
