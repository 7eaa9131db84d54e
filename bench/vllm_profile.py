"""vLLM's stage split on phicapd's vs_vllm workload, for the README's side-by-side profile.

Run with the vLLM venv's Python (``bash bench/vllm_cpu.sh setup``), not phicapd's:

    /work/venv-vllm/bin/python bench/vllm_profile.py --checkpoint /work/ckpt-vllm [--images 10]

vLLM's engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so its Phi-3-vision
classes can be timed where they are: the HF processor call (the HD transform, which is
phicapd's own processor as the checkpoint's remote code), the CLIP tower
(``get_img_features``), the merge + projector (``hd_feature_transform``) and the language
model's forward, split into steps with more tokens than rows (prefill) and the rest (decode).
Image decode (PIL open + RGB) is timed before the requests, as the server's loader does it.
The images are the repository's test photos with one pixel changed, all requests at once,
greedy, ``--new-tokens`` tokens: what ``bench/vs_vllm.py`` sends over HTTP.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fresh_images import fresh_images
from PIL import Image

PROMPT = "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"
seconds: dict[str, float] = defaultdict(float)


def timed(cls: type, name: str, stage: str | None = None) -> None:
    """Wrap ``cls.name`` so its wall time adds to ``seconds[stage]``."""
    inner = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            seconds[stage or name] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/ckpt-vllm"))
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.model_executor.models import phi3v

    timed(phi3v.Phi3VMultiModalProcessor, "_call_hf_processor", "HD transform (HF processor)")
    timed(phi3v.Phi3HDImageEmbedding, "get_img_features", "vision tower")
    timed(phi3v.Phi3HDImageEmbedding, "hd_feature_transform", "merge + projector")
    lm_forward = phi3v.Phi3VForCausalLM.forward

    def forward(self, input_ids, positions, *args, **kwargs):
        start = time.perf_counter()
        try:
            return lm_forward(self, input_ids, positions, *args, **kwargs)
        finally:
            # A step whose positions are not all distinct rows' next tokens holds a prompt.
            stage = "LM prefill" if positions.numel() > args_images else "LM decode"
            seconds[stage] += time.perf_counter() - start

    args_images = args.images
    phi3v.Phi3VForCausalLM.forward = forward

    llm = LLM(
        model=str(args.checkpoint),
        trust_remote_code=True,
        dtype="float32",
        max_model_len=4096,
        limit_mm_per_prompt={"image": 1},
        mm_processor_kwargs={"num_crops": args.num_crops},
        mm_processor_cache_gb=0,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        paths = fresh_images(Path(tmp) / "warm", 1, random.Random())
        llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": Image.open(paths[0]).convert("RGB")}}], params)
        seconds.clear()
        paths = fresh_images(Path(tmp) / "run", args.images, random.Random())
        start = time.perf_counter()
        images = [Image.open(p).convert("RGB") for p in paths]
        seconds["image decode"] = time.perf_counter() - start
        llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], params)
        total = time.perf_counter() - start
    print(f"\nvLLM {args.images} images, torch threads {torch.get_num_threads()}, total {total:.1f} s")
    print("| stage | s | share |")
    print("| --- | ---: | ---: |")
    for stage, s in seconds.items():
        print(f"| {stage} | {s:.2f} | {s / total:.0%} |")
    rest = total - sum(seconds.values())
    print(f"| other (scheduling, tokenizer, detokenizer) | {rest:.2f} | {rest / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
