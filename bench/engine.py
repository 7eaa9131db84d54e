"""Benchmark the generation engine against batch-1 baselines, all measured in the same run.

    python bench/engine.py --device cpu --model tiny          # CI-sized, seconds
    python bench/engine.py --device cuda --full-size-random   # Phi-3.5-vision shapes, random bf16 weights
    python bench/engine.py --device cuda --full-size-random --compile --batches 1,32 --no-baselines
    python bench/engine.py --profile --model CHECKPOINT    # per-stage times on photos (stage_profile.py)

Workload: identical 3:2 photos (1500x1000) at ``--num-crops``, the default caption prompt,
exactly ``--new-tokens`` new tokens (stop tokens ignored). Image preprocessing (the HD crops)
is done once up front: in the daemon it runs in the CPU decode pool, off the GPU's path. Each
timed figure covers vision tower + prefill + decode for every image.

Rows:
  * ``engine bN``: the static-cache engine with at most N rows in flight (continuous batching over
    2N images, at least 4), after a warm-up that captures its CUDA graphs / compiles.
  * ``loop b1``: the previous simple loop (``generation.generate``: dynamic cache, eager forward).
  * ``HF generate b1``: transformers' ``generate`` on the same input embeddings.

Each row is printed as soon as it is measured and ``--json`` is rewritten after each one, so a
run that is cut short keeps what it measured; a row that fails is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from random_model import full_size_random
from stage_profile import profile_main

from phicapd.config import DEFAULT_PROMPT
from phicapd.model.engine import EngineRequest, GenerationEngine
from phicapd.model.generation import generate
from phicapd.model.loading import load_model
from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.processing import ProcessedImage, preprocess_image
from phicapd.model.testmodel import build_tokenizer, make_test_model
from phicapd.model.tokenizer import Phi3VTokenizer, build_prompt


@dataclass
class Result:
    name: str
    batch: int
    images: int
    seconds: float
    decode_ms_per_step: float | None = None
    rows_per_step: float | None = None
    peak_gib: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def tiny(device: torch.device, dtype: torch.dtype) -> Phi3VForCausalLM:
    path = make_test_model(Path(tempfile.mkdtemp(prefix="phicapd-bench-")))
    return load_model(path, device=device, dtype=dtype, attn_implementation="sdpa")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def profile(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.model == "tiny":
        model = tiny(device, torch.float32)
        tokenizer = Phi3VTokenizer(build_tokenizer(), {}, add_bos=True)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_model(Path(args.model), device=device, dtype=dtype, attn_implementation="sdpa")
        tokenizer = Phi3VTokenizer.from_dir(Path(args.model))
    if not args.fused_vision:
        model._fused_clip = None
    batches = int(args.batches or "2")
    new = args.new_tokens or 16
    profile_main(model, tokenizer, num_crops=args.num_crops or 4, new_tokens=new, images=args.images, batches=batches)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny", help="'tiny' (default) or a checkpoint directory")
    ap.add_argument("--full-size-random", action="store_true", help="Phi-3.5-vision shapes, random bf16 weights")
    ap.add_argument("--num-crops", type=int, default=None, help="default 16 full size, 4 tiny")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128; --profile: 16 (as vs_vllm.py)")
    ap.add_argument("--batches", default=None, help="comma-separated; default 1,4,8,16,32 (cpu) / 1,8,16,32,48")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before CUDA-graph capture")
    ap.add_argument(
        "--attention",
        choices=["flex", "sdpa"],
        default=None,
        help="decode attention (default: flex when compiling, sdpa otherwise)",
    )
    ap.add_argument("--baseline-images", type=int, default=None, help="images per batch-1 baseline (default 4/2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    ap.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the batch-1 baselines (loop, HF generate); --no-baselines: the engine rows only",
    )
    ap.add_argument("--json", type=Path, help="also write the results here (rewritten after each row)")
    ap.add_argument("--profile", action="store_true", help="per-stage times of batches of photos (stage_profile.py)")
    ap.add_argument("--images", type=int, default=10, help="--profile: photos per batch")
    ap.add_argument(
        "--fused-vision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, CLIP's fused layers (vision_cpu.py); --no-fused-vision: transformers' CLIP",
    )
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return profile(args)
    args.new_tokens = args.new_tokens or 128

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    full = args.full_size_random
    if full:
        model = full_size_random(device, dtype)
    elif args.model == "tiny":
        model = tiny(device, dtype)
    else:
        model = load_model(Path(args.model), device=device, dtype=dtype, attn_implementation="sdpa")
    num_crops = args.num_crops or (16 if full else 4)
    default_batches = "1,8,16,32,48" if device.type == "cuda" else "1,4,8,16,32"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    n_base = args.baseline_images or (2 if device.type == "cuda" else 4)

    tokenizer = Phi3VTokenizer(build_tokenizer(), {}, add_bos=True)
    image: ProcessedImage = preprocess_image(Image.new("RGB", (1500, 1000), (90, 120, 150)), num_crops)
    ids = tokenizer.encode_prompt(build_prompt(DEFAULT_PROMPT), [image.num_tokens])
    new = args.new_tokens
    request = EngineRequest(ids, image, new)
    no_stops: frozenset[int] = frozenset()
    print(f"# {hardware(device)}")
    params = sum(p.numel() for p in model.parameters())
    name = "full-size random bf16" if full else args.model
    print(f"# model: {name} ({params / 1e6:.1f} M params), num_crops {num_crops}, prompt {len(ids)} tokens")
    print(f"# {new} new tokens per image, stop tokens ignored; preprocessing done once, outside the timings")

    def embeds() -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.tensor([ids])  # on the host, as the engine passes them
        return model.embed_images(input_ids, [image]), torch.ones_like(input_ids, device=device)

    def loop_b1() -> None:
        for _ in range(n_base):
            e, mask = embeds()
            generate(model.language_model, e, mask, [new], no_stops, 0)

    def hf_generate_b1() -> None:
        for _ in range(n_base):
            e, mask = embeds()
            out = model.language_model.generate(
                inputs_embeds=e,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_id,
            )
            assert out.shape[-1] >= new

    results: list[Result] = []
    failed: list[str] = []
    ctx = GenerationEngine.ctx_for(len(ids) + new)
    engine = GenerationEngine(
        model,
        max_slots=max(batches),
        compile=args.compile,
        attention=args.attention,
        pool_tokens=max(batches) * ctx,
        prefill_tokens=8192,
    )
    header = (
        f"{'config':<16} {'images':>6} {'img/s':>9} {'ms/img':>9} {'decode ms/step':>15} {'rows/step':>9}"
        f" {'peak GiB':>9} {'x engine b1':>11} {'x HF b1':>8}"
    )

    def find(name: str) -> Result | None:
        return next((r for r in results if r.name == name), None)

    def row(r: Result) -> str:
        step = f"{r.decode_ms_per_step:.2f}" if r.decode_ms_per_step is not None else "-"
        rows = f"{r.rows_per_step:.1f}" if r.rows_per_step is not None else "-"
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
        b1, hf = find("engine b1"), find("HF generate b1")
        x_b1 = f"{r.rate / b1.rate:.2f}" if b1 else "-"
        x_hf = f"{r.rate / hf.rate:.2f}" if hf else "-"
        return (
            f"{r.name:<16} {r.images:>6} {r.rate:>9.3f} {1000 / r.rate:>9.1f} {step:>15} {rows:>9} {peak:>9}"
            f" {x_b1:>11} {x_hf:>8}"
        )

    def record(r: Result) -> None:
        """Keep a row, print it, and rewrite the JSON: a run cut short still leaves what it measured."""
        results.append(r)
        print(row(r), flush=True)
        if args.json:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps([vars(x) | {"img_per_s": x.rate} for x in results], indent=2) + "\n")
            tmp.replace(args.json)

    def failure(name: str, e: BaseException) -> None:
        failed.append(name)
        print(f"{name:<16} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with torch.inference_mode():
        # Warm-up outside the timings: kernels, allocator, and (CUDA) graphs / compilation.
        started = time.perf_counter()
        engine.warm_up(ctx, max(batches))
        engine.generate([request], no_stops)
        print(f"# warm-up (b{max(batches)}, {engine.describe()['decode']}, {engine.attention}):", end=" ")
        print(f"{time.perf_counter() - started:.1f} s", flush=True)
        print(header)
        print("-" * len(header), flush=True)
        baselines = (("loop b1", loop_b1), ("HF generate b1", hf_generate_b1)) if args.baselines else ()
        for name, fn in baselines:
            try:
                n_warm, n_base = n_base, 1
                try:
                    fn()
                finally:
                    n_base = n_warm
                record(Result(name, 1, n_base, timed(device, fn)))
            except Exception as e:
                failure(name, e)
        for batch in batches:
            try:
                # A pool of exactly ``batch`` rows, so that the peak memory is this batch's own.
                engine.max_slots = batch
                engine.set_pool_tokens(batch * ctx)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                engine.warm_up(ctx, batch)
                engine.reset_stats()
                n = max(2 * batch, 4)
                seconds = timed(device, lambda n=n: engine.generate([request] * n, no_stops))
                s = engine.stats
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                record(
                    Result(
                        f"engine b{batch}",
                        batch,
                        n,
                        seconds,
                        decode_ms_per_step=1000 * s["decode_s"] / max(1, s["decode_steps"]),
                        rows_per_step=s["decode_rows"] / max(1, s["decode_steps"]),
                        peak_gib=peak,
                    )
                )
            except Exception as e:
                failure(f"engine b{batch}", e)

    print()
    info = engine.describe()
    kv = f"KV cache {engine.bytes_per_token} bytes/token, ctx {ctx}"
    print(f"decode: {info['decode']}, {engine.attention} attention; {kv}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(row(r))
    print()
    engines = [r for r in results if r.name.startswith("engine")]
    if engines:
        b1 = find("engine b1") or engines[0]
        best = max(engines, key=lambda r: r.rate)
        print(f"best engine batch ({best.name}) vs {b1.name}: {best.rate / b1.rate:.2f}x")
        for name in ("HF generate b1", "loop b1"):
            base = find(name)
            if base:
                print(f"best engine batch vs {name}: {best.rate / base.rate:.2f}x")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
