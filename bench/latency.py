"""Interactive latency through the real daemon: idle, and while a watched backlog is captioned.

    python bench/latency.py                                   # tiny test checkpoint on the CPU
    python bench/latency.py --model /srv/models/Phi-3.5-vision-instruct --device cuda --num-crops 16
    python bench/latency.py --full-size-random --device cuda --num-crops 16 --new-tokens 128 --max-batch 32

Starts the daemon in-process with the real model, then sends ``--requests`` sequential
``POST /v1/caption`` requests over its Unix socket, first with nothing else to do, then while
``--backlog`` images dropped into a watched directory are being captioned. With
``--full-size-random`` the model is Phi-3.5-vision's full architecture with random bf16 weights
(no download; captions are noise but every one runs its full token budget). Prints p50/p95/max
per phase, the backlog's throughput while the requests ran, and the ratio of loaded to idle p95.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from random_model import full_size_random

from phicapd.config import Settings, load_settings
from phicapd.control.client import ControlClient
from phicapd.log import configure_logging
from phicapd.model.captioner import Phi3VCaptioner
from phicapd.model.testmodel import build_tokenizer, make_test_model
from phicapd.model.tokenizer import Phi3VTokenizer
from phicapd.service import Daemon, load_model_captioner


def photo(index: int, size: tuple[int, int] = (750, 500)) -> Image.Image:
    """A 3:2 'photo' that differs per index (noise plus a coloured band)."""
    image = Image.effect_noise(size, 40 + index % 50).convert("RGB")
    band = Image.new("RGB", (size[0], size[1] // 8), ((index * 37) % 256, (index * 91) % 256, 128))
    image.paste(band, (0, (index * 53) % (size[1] - band.size[1])))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def settings_for(work: Path, args: argparse.Namespace, model_dir: Path) -> Settings:
    cfg = work / "latency.toml"
    cfg.write_text(
        f'[model]\npath = "{model_dir}"\ndevice = "{args.device}"\nnum_crops = {args.num_crops}\n'
        f"max_new_tokens = {args.new_tokens}\nmax_batch = {args.max_batch}\n"
        f"[scheduler]\ninteractive_slots = {args.interactive_slots}\n"
        "[watcher]\nsettle_seconds = 0.2\nrescan_interval_seconds = 0\n"
        f'[control]\nsocket = "{work / "ctl.sock"}"\n[state]\ndir = "{work / "state"}"\n'
        f'[log]\nformat = "json"\nlevel = "warning"\n[[watch]]\npath = "{work / "inbox"}"\n'
    )
    return load_settings(cfg)


def measure(client: ControlClient, requests: list[bytes]) -> tuple[list[float], int]:
    seconds, tokens = [], 0
    for i, data in enumerate(requests):
        started = time.monotonic()
        reply = client.caption_bytes(data, name=f"request{i}.png", prompt=None, max_new_tokens=None)
        seconds.append(time.monotonic() - started)
        tokens += reply.new_tokens
    return seconds, tokens


def summary(name: str, seconds: list[float], extra: str = "") -> tuple[str, float]:
    q = statistics.quantiles(seconds, n=20, method="inclusive")
    p50, p95 = statistics.median(seconds), q[18]
    line = f"{name:28} {len(seconds):8d} {p50 * 1000:9.0f} {p95 * 1000:9.0f} {max(seconds) * 1000:9.0f}  {extra}"
    return line, p95


def random_captioner(settings: Settings) -> Any:
    device = torch.device(settings.model.device)
    model = full_size_random(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = Phi3VTokenizer(build_tokenizer(), {}, add_bos=True)
    return Phi3VCaptioner(model, tokenizer, settings.model, "full-size-random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (made on the fly) or a checkpoint directory")
    parser.add_argument("--full-size-random", action="store_true", help="full architecture, random bf16 weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--interactive-slots", type=int, default=1, help="rows kept free of background work")
    args = parser.parse_args()
    configure_logging("json", "warning")

    work = Path(tempfile.mkdtemp(prefix="phicapd-latency-"))
    (work / "inbox").mkdir()
    model_dir = make_test_model(work / "tiny") if args.model == "tiny" else Path(args.model)
    settings = settings_for(work, args, model_dir)
    daemon = Daemon(settings, random_captioner if args.full_size_random else load_model_captioner)
    thread = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    started = time.monotonic()
    thread.start()
    if not daemon.wait_ready(1800):
        raise SystemExit("the model did not become ready")
    load_seconds = time.monotonic() - started
    client = ControlClient(settings.control.socket, timeout=600, caption_timeout=600)
    requests = [png_bytes(photo(10_000 + i)) for i in range(args.requests)]
    try:
        idle, _ = measure(client, requests)
        staging = work / "staging"
        staging.mkdir()
        for i in range(args.backlog):
            photo(i).save(staging / f"backlog{i:05d}.png")
        for path in sorted(staging.iterdir()):  # the whole backlog lands at once
            path.rename(work / "inbox" / path.name)
        while daemon.store.counts()["done"] < max(1, args.max_batch // 2):
            time.sleep(0.05)
        done_before, t0 = daemon.store.counts()["done"], time.monotonic()
        loaded, _ = measure(client, requests)
        counts, elapsed = daemon.store.counts(), time.monotonic() - t0
        background_rate = (counts["done"] - done_before) / elapsed
        remaining = counts["pending"] + counts["running"]
    finally:
        daemon.request_stop()
        thread.join(120)

    model_name = "full-size random" if args.full_size_random else args.model
    print(
        f"\nphicapd interactive latency: model {model_name} on {args.device}, num_crops {args.num_crops}, "
        f"max_new_tokens {args.new_tokens}, max_batch {args.max_batch}, interactive_slots {args.interactive_slots} "
        f"(ready after {load_seconds:.1f} s)"
    )
    print(f"{'phase':28} {'requests':>8} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    idle_line, idle_p95 = summary("idle", idle)
    loaded_line, loaded_p95 = summary(
        f"with a {args.backlog}-image backlog",
        loaded,
        f"backlog {background_rate:.2f} img/s meanwhile, {remaining} still queued at the end",
    )
    print(idle_line)
    print(loaded_line)
    print(f"p95 with backlog / p95 idle: {loaded_p95 / idle_p95:.2f}x")


if __name__ == "__main__":
    main()
