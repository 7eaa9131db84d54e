"""Where a batch's time goes in phicapd's native engine: ``python bench/engine.py --profile``.

    python bench/engine.py --profile --model /work/ckpt-vllm [--images 10] [--batches 2]
    python bench/engine.py --profile --model /work/ckpt-vllm --no-fused-vision   # transformers' CLIP

Per batch of ``--images`` fresh photos (``fresh_images``: the test photos, one pixel changed):
image decode (PIL open + RGB) and the HD transform (``preprocess_image``), each over the decode
pool's threads as the daemon runs them, then one ``engine.generate`` over the batch, split
into the vision tower (CLIP), the projector (merge + ``img_projection``), the LM prefill
(``_prefill``) and decode (the engine's own ``decode_s``). "other" is the rest of
``generate``: embedding, the scatter, sampling and bookkeeping. Prints the threads in use.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fresh_images import fresh_images
from PIL import Image

from phicapd.config import default_decode_workers
from phicapd.model.engine import EngineRequest, GenerationEngine
from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.processing import preprocess_image
from phicapd.model.tokenizer import Phi3VTokenizer, build_prompt

PROMPT = "Describe this image."  # bench/vs_vllm.py's
STAGES = ("image decode", "HD transform", "vision tower", "projector", "LM prefill", "LM decode", "other")


@contextmanager
def stage_clock(model: Phi3VForCausalLM, engine: GenerationEngine) -> Iterator[dict[str, float]]:
    """Seconds per stage while the block runs, by wrapping the model's and engine's own methods."""
    seconds: dict[str, float] = defaultdict(float)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def wrap(owner: Any, name: str, stage: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                sync()
                seconds[stage] += time.perf_counter() - start

        setattr(owner, name, timed)  # an instance attribute: shadows the method, removed below

    patched = [(model, "clip_hidden_states"), (model.img_projection, "forward"), (engine, "_prefill")]
    for (owner, name), stage in zip(patched, ("vision tower", "projector", "LM prefill"), strict=True):
        wrap(owner, name, stage)
    try:
        yield seconds
    finally:
        for owner, name in patched:
            delattr(owner, name)


def profile_main(
    model: Phi3VForCausalLM,
    tokenizer: Phi3VTokenizer,
    *,
    num_crops: int,
    new_tokens: int,
    images: int,
    batches: int,
    workers: int | None = None,
) -> list[dict[str, float]]:
    """Print and return the stage seconds of ``batches`` batches of ``images`` fresh photos."""
    workers = workers or default_decode_workers()
    dtype = model.vision_tower.dtype
    engine = GenerationEngine(model, max_slots=images)
    print(
        f"# threads: torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()},"
        f" decode pool {workers}; vision: {'fused CPU layers' if model._fused_clip else 'transformers CLIP'}"
    )
    print(f"# {images} fresh photos a batch, num_crops {num_crops}, at most {new_tokens} new tokens")
    rows = []
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="phicapd-profile-") as tmp, ThreadPoolExecutor(workers) as pool:
        # Warm-up: kernels, allocator, the KV pool.
        warm = preprocess_image(Image.new("RGB", (640, 480), (90, 120, 150)), num_crops, dtype)
        with torch.inference_mode():
            engine.generate([request(tokenizer, warm, 2)], tokenizer.stop_ids)
        print("| batch | " + " | ".join(STAGES) + " | total s | img/s |")
        print("| ---: |" + " ---: |" * (len(STAGES) + 2))
        for b in range(batches):
            paths = fresh_images(Path(tmp) / f"b{b}", images, rng)
            seconds: dict[str, float] = {}
            start = time.perf_counter()
            pils = list(pool.map(lambda p: Image.open(p).convert("RGB"), paths))
            seconds["image decode"] = time.perf_counter() - start
            mark = time.perf_counter()
            prepared = list(pool.map(lambda im: preprocess_image(im, num_crops, dtype), pils))
            seconds["HD transform"] = time.perf_counter() - mark
            reqs = [request(tokenizer, im, new_tokens) for im in prepared]
            engine.reset_stats()
            mark = time.perf_counter()
            with torch.inference_mode(), stage_clock(model, engine) as inner:
                engine.generate(reqs, tokenizer.stop_ids)
            generate = time.perf_counter() - mark
            seconds.update(inner)
            seconds["LM decode"] = engine.stats["decode_s"]
            seconds["other"] = generate - sum(seconds.get(s, 0.0) for s in STAGES[2:6])
            total = time.perf_counter() - start
            cells = " | ".join(f"{seconds.get(s, 0.0):.2f}" for s in STAGES)
            print(f"| {b + 1} | {cells} | {total:.1f} | {images / total:.3f} |", flush=True)
            rows.append(seconds | {"total": total})
    return rows


def request(tokenizer: Phi3VTokenizer, image: Any, new_tokens: int) -> EngineRequest:
    return EngineRequest(tokenizer.encode_prompt(build_prompt(PROMPT), [image.num_tokens]), image, new_tokens)
