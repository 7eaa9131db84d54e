"""Interactive latency through the real daemon: idle, and while a watched backlog is captioned.

    python bench/latency.py                                   # tiny test checkpoint on the CPU
    python bench/latency.py --model /srv/models/Phi-3.5-vision-instruct --device cuda --num-crops 16
    python bench/latency.py --full-size-random --device cuda --num-crops 16 --new-tokens 128 --max-batch 32

Starts the daemon in-process with the real model, then sends ``--requests`` sequential
``POST /v1/caption`` requests over its Unix socket, first with nothing else to do, then while
``--backlog`` images dropped into a watched directory are being captioned. With
``--full-size-random`` the model is Phi-3.5-vision's full architecture with random bf16 weights
(no download; captions are noise and may stop early: the mean new tokens per request shows it).
Prints each phase's p50/p95/max as soon as it is measured, the backlog's throughput while the
requests ran, and the ratio of loaded to idle p95. ``[model] compile`` is off unless
``--compile`` (on a GPU it compiles the decode step at warm-up: minutes at full size).
"""

from __future__ import annotations

import argparse
import io
import os
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
from phicapd.control.client import ControlClient, RequestFailed
from phicapd.errors import CAPTION_EMPTY
from phicapd.log import configure_logging
from phicapd.model.captioner import Phi3VCaptioner
from phicapd.model.testmodel import build_tokenizer, make_test_model
from phicapd.model.tokenizer import Phi3VTokenizer
from phicapd.service import Daemon, load_model_captioner


def say(*parts: object) -> None:
    print(*parts, flush=True)


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
        f"compile = {'true' if args.compile else 'false'}\n"
        f"[scheduler]\ninteractive_slots = {args.interactive_slots}\n"
        "[watcher]\nsettle_seconds = 0.2\nrescan_interval_seconds = 0\n"
        f'[control]\nsocket = "{work / "ctl.sock"}"\n[state]\ndir = "{work / "state"}"\n'
        f'[log]\nformat = "json"\nlevel = "warning"\n[[watch]]\npath = "{work / "inbox"}"\n'
    )
    return load_settings(cfg)


class DaemonThread(threading.Thread):
    """``Daemon.run`` in a thread that keeps what it raised or returned, for the waits to report."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(name="phicapd", daemon=True)
        self.phicapd = daemon
        self.error: BaseException | None = None
        self.rc: int | None = None

    def run(self) -> None:
        try:
            self.rc = self.phicapd.run(install_signals=False)
        except BaseException as e:  # reported by check()
            self.error = e

    def check(self, doing: str) -> None:
        """Exit with the daemon's error if its thread has ended."""
        if self.is_alive():
            return
        if self.error is not None:
            raise SystemExit(f"the daemon failed {doing}: {type(self.error).__name__}: {self.error}")
        raise SystemExit(f"the daemon exited {doing} (rc {self.rc})")


def wait_ready(daemon: Daemon, runner: DaemonThread, timeout: float, started: float) -> None:
    deadline = started + timeout
    while not daemon.lifecycle.wait_ready(1.0):
        runner.check("while loading the model")
        if time.monotonic() > deadline:
            raise SystemExit(f"the model was not ready after {timeout:.0f} s (daemon state {daemon.lifecycle.phase!r})")
    runner.check("while loading the model")


def wait_for_backlog(daemon: Daemon, runner: DaemonThread, want: int, timeout: float) -> None:
    """Until ``want`` backlog images are captioned: the backlog is then running, not still being found."""
    started = time.monotonic()
    while True:
        runner.check("while captioning the backlog")
        counts = daemon.store.counts()
        if counts["done"] >= want:
            return
        if time.monotonic() - started > timeout:
            scheduler = daemon.scheduler
            broken = scheduler.broken if scheduler is not None else None
            raise SystemExit(
                f"only {counts['done']} of the backlog captioned after {timeout:.0f} s (waiting for {want}): "
                f"journal {counts}, daemon state {daemon.lifecycle.phase!r}, scheduler broken: {broken}"
            )
        time.sleep(0.05)


def measure(
    client: ControlClient, requests: list[bytes], budget: float | None, runner: DaemonThread
) -> tuple[list[float], list[int]]:
    """Seconds and new tokens per request, sent one after the other; stops after ``budget`` seconds
    (at least two requests) or at the first failed request (reported, with what was measured)."""
    seconds: list[float] = []
    tokens: list[int] = []
    phase_start = time.monotonic()
    for i, data in enumerate(requests):
        if budget is not None and len(seconds) >= 2 and time.monotonic() - phase_start > budget:
            say(f"  (phase budget of {budget:.0f} s spent after {len(seconds)} requests)")
            break
        started = time.monotonic()
        try:
            reply = client.caption_bytes(data, name=f"request{i}.png", prompt=None, max_new_tokens=None)
        except RequestFailed as e:
            if e.code != CAPTION_EMPTY:
                say(f"  request {i} failed after {time.monotonic() - started:.1f} s: {type(e).__name__}: {e}")
                runner.check("during the requests")
                break
            # The random-weight models caption some images with nothing: the request still ran its
            # full course on the model, so its latency counts (its tokens are unknown: not counted).
            seconds.append(time.monotonic() - started)
            continue
        except Exception as e:
            say(f"  request {i} failed after {time.monotonic() - started:.1f} s: {type(e).__name__}: {e}")
            runner.check("during the requests")
            break
        seconds.append(time.monotonic() - started)
        tokens.append(reply.new_tokens)
    return seconds, tokens


def summary(name: str, seconds: list[float], tokens: list[int], extra: str = "") -> tuple[str, float]:
    if not seconds:
        return f"{name:28} {0:8d}  (no request completed)", float("nan")
    p50 = statistics.median(seconds)
    p95 = statistics.quantiles(seconds, n=20, method="inclusive")[18] if len(seconds) > 1 else seconds[0]
    mean_tokens = statistics.fmean(tokens) if tokens else float("nan")  # every caption was blank
    line = (
        f"{name:28} {len(seconds):8d} {p50 * 1000:9.0f} {p95 * 1000:9.0f} {max(seconds) * 1000:9.0f}"
        f" {mean_tokens:10.1f}  {extra}"
    )
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
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="[model] compile: torch.compile the decode step at warm-up (GPU only; default off)",
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for load + warm-up")
    parser.add_argument(
        "--backlog-timeout", type=float, default=300, help="seconds to wait for the backlog's first images"
    )
    parser.add_argument(
        "--phase-seconds", type=float, default=None, help="stop a phase's requests after this long (min 2 sent)"
    )
    args = parser.parse_args()
    configure_logging("json", "warning")

    model_name = "full-size random" if args.full_size_random else args.model
    say(
        f"phicapd interactive latency: model {model_name} on {args.device}, num_crops {args.num_crops}, "
        f"max_new_tokens {args.new_tokens}, max_batch {args.max_batch}, interactive_slots {args.interactive_slots}, "
        f"compile {'on' if args.compile else 'off'}"
    )
    work = Path(tempfile.mkdtemp(prefix="phicapd-latency-"))
    (work / "inbox").mkdir()
    model_dir = make_test_model(work / "tiny") if args.model == "tiny" else Path(args.model)
    settings = settings_for(work, args, model_dir)
    daemon = Daemon(settings, random_captioner if args.full_size_random else load_model_captioner)
    runner = DaemonThread(daemon)
    started = time.monotonic()
    runner.start()
    # The backlog and the requests are made while the model loads.
    staging = work / "staging"
    staging.mkdir()
    for i in range(args.backlog):
        photo(i).save(staging / f"backlog{i:05d}.png")
    requests = [png_bytes(photo(10_000 + i)) for i in range(args.requests)]
    wait_ready(daemon, runner, args.ready_timeout, started)
    say(f"ready after {time.monotonic() - started:.1f} s")
    client = ControlClient(settings.control.socket, timeout=600, caption_timeout=600)
    say(f"{'phase':28} {'requests':>8} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9} {'new tok':>10}")
    try:
        idle, idle_tokens = measure(client, requests, args.phase_seconds, runner)
        idle_line, idle_p95 = summary("idle", idle, idle_tokens)
        say(idle_line)
        for path in sorted(staging.iterdir()):  # the whole backlog lands at once
            path.rename(work / "inbox" / path.name)
        wait_for_backlog(daemon, runner, min(args.backlog, max(1, args.max_batch // 2)), args.backlog_timeout)
        done_before, t0 = daemon.store.counts()["done"], time.monotonic()
        loaded, loaded_tokens = measure(client, requests, args.phase_seconds, runner)
        counts, elapsed = daemon.store.counts(), time.monotonic() - t0
        background_rate = (counts["done"] - done_before) / elapsed
        remaining = counts["pending"] + counts["running"]
        loaded_line, loaded_p95 = summary(
            f"with a {args.backlog}-image backlog",
            loaded,
            loaded_tokens,
            f"backlog {background_rate:.2f} img/s meanwhile, {remaining} still queued at the end",
        )
        say(loaded_line)
        say(f"p95 with backlog / p95 idle: {loaded_p95 / idle_p95:.2f}x")
    finally:
        daemon.request_stop()
        runner.join(60)
    if runner.is_alive():  # still draining a batch: the figures are out, do not wait for it
        say("(the daemon was still stopping after 60 s; exiting without it)")
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
