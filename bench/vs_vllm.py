"""phicapd's native engine against vLLM: same checkpoint, same fresh images, taking turns.

    python bench/vs_vllm.py                      # CPU: /work/ckpt-vllm, vLLM from /work/venv-vllm
    python bench/vs_vllm.py --device cuda --checkpoint DIR --venv VENV

About 15 minutes on the 2-core CPU with the defaults (vLLM's start 4-5 minutes, then two rounds
of about 100 s a side); the exit status is 1 when a caption differs.

Both servers are started once, from the same checkpoint (a checkpoint vLLM can serve:
``bash bench/vllm_cpu.sh model DIR`` makes the CPU one), and each is stopped (SIGSTOP on its
whole process group) while the other runs, so neither steals the other's cores or its
memory bandwidth. Every round makes ``--images`` fresh photos (the repository's test photos,
one pixel changed each, so no cache on either side has seen them) and gives the *same* files to
both sides, the order of the sides alternating from round to round:

* vLLM: ``--images`` chat-completions requests at once (the file's own bytes, greedy,
  ``--new-tokens``), timed from the first request to the last reply;
* phicapd: the daemon (``backend = "native"``) started with ``phicapd run``, one
  ``phicapctl caption-dir --stdout --json`` over the directory, timed around that command.

Prints a row per round (both times, vLLM time / phicapd time: above 1.0 phicapd is the faster)
and whether the captions agree, file by file (both cleaned as phicapd stores any caption).
On a GPU machine: both installed (vLLM with CUDA in ``--venv``, phicapd in this Python), the
checkpoint on local disk; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fresh_images import fresh_images  # noqa: E402

from phicapd.caption_text import clean_caption  # noqa: E402
from phicapd.config import ModelSettings  # noqa: E402

PROMPT = "Describe this image."
SERVED = "phicapd-bench"
START_SECONDS = 1800.0  # vLLM takes about 3 minutes on two idle cores, far more on busy ones


@dataclass
class Side:
    """One server: its process group, stopped between its turns."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited with {self.proc.returncode}; log: {self.log}")


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str]) -> Side:
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    return Side(name, proc, log)


def wait_until(side: Side, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        side.alive()
        if ready():
            return
        time.sleep(2)
    raise SystemExit(f"timed out waiting for {what} (log: {side.log})")


# -- vLLM --------------------------------------------------------------------------------------


def start_vllm(args: argparse.Namespace, work: Path) -> Side:
    log = work / "vllm.log"
    if args.device == "cpu":
        argv = ["bash", "bench/vllm_cpu.sh", "serve", str(args.checkpoint), str(args.port), str(args.venv)]
    else:
        argv = [
            f"{args.venv}/bin/python", "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.checkpoint), "--served-model-name", SERVED, "--trust-remote-code",
            "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}',
            "--mm-processor-kwargs", json.dumps({"num_crops": args.num_crops}), "--dtype", "bfloat16",
            "--host", "127.0.0.1", "--port", str(args.port),
        ]  # fmt: skip
    side = spawn("vLLM", argv, log, {"SERVED_MODEL_NAME": SERVED})

    def answers() -> bool:
        try:
            return _http(args.port, "GET", "/v1/models", None, 5)[0] == 200
        except OSError:
            return False

    wait_until(side, answers, f"vLLM on port {args.port}")
    return side


def _http(port: int, method: str, path: str, body: object, timeout: float) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def run_vllm(port: int, images: list[Path], tokens: int) -> tuple[float, dict[str, str]]:
    def ask(path: Path) -> str:
        data = f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": data}}]
        body = {"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": tokens}
        status, reply = _http(port, "POST", "/v1/chat/completions", body | {"temperature": 0.0}, 3600)
        if status != 200:
            raise SystemExit(f"vLLM answered {status}: {str(reply)[:300]}")
        return reply["choices"][0]["message"]["content"]

    started = time.monotonic()
    with ThreadPoolExecutor(len(images)) as pool:
        texts = list(pool.map(ask, images))
    return time.monotonic() - started, {p.name: t for p, t in zip(images, texts, strict=True)}


# -- phicapd -----------------------------------------------------------------------------------


def start_phicapd(args: argparse.Namespace, work: Path) -> tuple[Side, Path]:
    socket = work / "ctl.sock"
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    config = work / "phicapd.toml"
    config.write_text(
        f'[model]\nbackend = "native"\npath = "{args.checkpoint}"\ndevice = "{args.device}"\ndtype = "{dtype}"\n'
        f'prompt = "{PROMPT}"\nnum_crops = {args.num_crops}\nmax_new_tokens = {args.new_tokens}\n'
        f'[control]\nsocket = "{socket}"\n[state]\ndir = "{work / "state"}"\n[log]\nformat = "json"\n'
        'level = "warning"\n'
    )
    argv = [sys.executable, "-m", "phicapd.cli.daemon", "run", "--config", str(config)]
    side = spawn("phicapd", argv, work / "phicapd.log", {"PYTHONPATH": str(REPO)})

    def healthy() -> bool:
        return _ctl(socket, ["health"], check=False).returncode == 0

    wait_until(side, healthy, "phicapd to be ready")
    return side, socket


def _ctl(socket: Path, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "phicapd.cli.ctl", "--socket", str(socket), *argv]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if check and done.returncode != 0:
        raise SystemExit(f"phicapctl {' '.join(argv)} failed ({done.returncode}): {done.stderr[-500:]}")
    return done


def run_phicapd(socket: Path, directory: Path) -> tuple[float, dict[str, str]]:
    started = time.monotonic()
    done = _ctl(socket, ["caption-dir", str(directory), "--stdout", "--json", "--caption-timeout", "3600"])
    seconds = time.monotonic() - started
    captions = {}
    for line in done.stdout.splitlines():
        item = json.loads(line)
        captions[Path(item["path"]).name] = item.get("caption")
    return seconds, captions


# -- the comparison ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/ckpt-vllm"), help="a checkpoint both can load")
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("VLLM_VENV", "/work/venv-vllm")))
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs; the side that goes first alternates")
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--seed", type=int, default=None, help="for the changed pixels (default: a fresh one)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    strip = ModelSettings().strip_openers
    rows = []
    with tempfile.TemporaryDirectory(prefix="phicapd-vs-vllm-") as tmp:
        work = Path(tmp)
        print("# starting vLLM (minutes) ...", flush=True)
        vllm = start_vllm(args, work)
        vllm.pause()
        phicapd = None
        try:
            print("# starting phicapd ...", flush=True)
            phicapd, socket = start_phicapd(args, work)
            phicapd.pause()
            for r in range(args.rounds):
                images = fresh_images(work / f"round{r}", args.images, rng)
                order = ("vllm", "phicapd") if r % 2 == 0 else ("phicapd", "vllm")
                got: dict[str, tuple[float, dict[str, str]]] = {}
                for side in order:
                    server = vllm if side == "vllm" else phicapd
                    server.resume()
                    try:
                        if side == "vllm":
                            got[side] = run_vllm(args.port, images, args.new_tokens)
                        else:
                            got[side] = run_phicapd(socket, images[0].parent)
                    finally:
                        server.pause()
                    print(f"# round {r + 1} {side}: {got[side][0]:.1f} s", flush=True)
                v_s, v_caps = got["vllm"]
                p_s, p_caps = got["phicapd"]
                differ = [n for n in sorted(v_caps) if clean_caption(v_caps[n], strip) != p_caps.get(n)]
                rows.append((r + 1, order[0], v_s, p_s, differ))
                for name in differ:
                    print(f"#   {name}: vLLM {v_caps[name]!r} / phicapd {p_caps.get(name)!r}")
        finally:
            vllm.stop()
            if phicapd is not None:
                phicapd.stop()
    print(f"\n{args.device}: {args.images} fresh images a round, num_crops {args.num_crops}, {args.new_tokens} tokens")
    print("| round | first | vLLM s | phicapd s | vLLM / phicapd | captions |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    for r, first, v, p, differ in rows:
        agree = "identical" if not differ else f"{len(differ)} differ"
        print(f"| {r} | {first} | {v:.1f} | {p:.1f} | {v / p:.2f} | {agree} |")
    return 1 if any(d for *_, d in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
