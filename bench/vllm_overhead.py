"""What phicapd adds in front of a real vLLM: the same work straight to the server and through the daemon.

    bash bench/vllm_cpu.sh serve CHECKPOINT 8011 VENV &        # a server with the README's recipe
    python bench/vllm_overhead.py --url http://127.0.0.1:8011/v1 [--images 8] [--concurrency 4] [--rounds 1]

Each side gets its own fresh images (the repository's test photos with one pixel changed, so
neither vLLM's prefix cache nor its encoder cache has seen them), and the sides alternate:

* direct: ``--images`` chat-completions requests, ``--concurrency`` at a time, each carrying the
  file's own bytes, timed from the first request to the last reply;
* phicapd: the daemon (``backend = "openai"``, its defaults but the endpoint, the served model,
  the prompt, ``num_crops``, ``max_new_tokens`` and ``max_in_flight = --concurrency``) watching a
  directory the same number of images is copied into, timed from the copy to the last caption
  recorded in the journal (the settle time, decoding, re-encoding, HTTP and the sidecar writes
  all inside).

Prints both throughputs and phicapd / direct: 1.00 means phicapd costs nothing the server's time
does not hide. Run it with nothing else busy on the machine.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fresh_images import fresh_images  # noqa: E402

from phicapd.service import load_model_captioner  # noqa: E402
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for  # noqa: E402

PROMPT = "Describe this image."


def direct(url: str, model: str, images: list[Path], concurrency: int, tokens: int) -> float:
    parts = urlsplit(url)

    def ask(path: Path) -> None:
        data = f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": data}}]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens}
        body["temperature"] = 0.0
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
        conn.request("POST", f"{parts.path}/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()[:300]
        reply.read()
        conn.close()

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(ask, images))
    return time.monotonic() - started


def through_phicapd(url: str, model: str, images: list[Path], work: Path, args: argparse.Namespace) -> float:
    root = work / "watched"
    root.mkdir()
    extra = (
        f'[model]\nbackend = "openai"\nprompt = "{PROMPT}"\nnum_crops = {args.num_crops}\n'
        f"max_new_tokens = {args.new_tokens}\n"
        f'[remote]\nendpoints = ["{url}"]\nmodel = "{model}"\n'
        f"initial_in_flight = {args.concurrency}\nmax_in_flight = {args.concurrency}\n"
    )
    settings = settings_for(work, [root], extra=extra)
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        started = time.monotonic()
        for path in images:
            shutil.copyfile(path, root / path.name)
        wait_for(
            lambda: (
                daemon.store.counts()["done"] + daemon.store.counts()["failed"] >= len(images) and is_settled(daemon)
            ),
            3600,
            "every caption",
            interval=0.05,
        )
        seconds = time.monotonic() - started
        failed = daemon.store.counts()["failed"]
    assert failed == 0, f"{failed} images failed through phicapd"
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the vLLM endpoint, ending in /v1")
    ap.add_argument("--model", default="phicapd-test", help="the served model name")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    rng = random.Random()
    rows = []
    with tempfile.TemporaryDirectory(prefix="phicapd-vllm-overhead-") as tmp:
        for r in range(args.rounds):
            d = direct(
                args.url,
                args.model,
                fresh_images(Path(tmp) / f"d{r}", args.images, rng),
                args.concurrency,
                args.new_tokens,
            )
            work = Path(tmp) / f"p{r}"
            work.mkdir()
            p = through_phicapd(args.url, args.model, fresh_images(Path(tmp) / f"i{r}", args.images, rng), work, args)
            rows.append((r + 1, d, p))
    print(f"\n{args.images} fresh images per side, {args.concurrency} in flight, {args.new_tokens} new tokens")
    print("| round | direct s | direct img/s | phicapd s | phicapd img/s | phicapd / direct |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r, d, p in rows:
        print(f"| {r} | {d:.1f} | {args.images / d:.3f} | {p:.1f} | {args.images / p:.3f} | {d / p:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
