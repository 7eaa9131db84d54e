"""A loopback server that speaks OpenAI chat-completions the way vLLM does, for tests and bench.

It checks what vLLM would (the bearer key, the served model name, one user turn with a text part
and an ``image_url`` part holding a base64 data URL that decodes as an image), answers with
vLLM's reply shape, and its error bodies are vLLM's: ``{"object": "error", "message": ...,
"type": ..., "param": null, "code": ...}``. The caption is a pure function of the pixels
(``tests.support.fakes.image_key``), so a test can tell which image a caption belongs to.

Misbehaviour on demand: ``fail(action, n)`` makes the next ``n`` chat requests ``503``/``429``
(with ``Retry-After``), ``500``, ``drop`` (close the connection without a reply), ``malformed``
(a 200 that is not JSON) or ``slow`` (wait ``slow_seconds`` first); an image 13 pixels wide is
refused with vLLM's 400 naming the image; more than ``limit`` requests at once get a 429.
``for_image(key, action, n)`` does the same for the requests of one image (every one when
``n`` is None), with these besides: ``reset`` (half the reply, then a TCP reset), ``drip`` (the
reply body a byte every ``drip_seconds``), ``drip_head`` (the whole reply so, from its status
line), ``huge`` (a 200 whose caption is 20 MiB) and ``endless`` (a chunked 200 that never ends).
``captions[key] = (text, completion_tokens)`` makes the caption of that image whatever a test needs.

Run as ``python -m tests.support.openai_server --port 0 [--latency S] [--limit N]``: it prints
its port on the first line and serves until killed (the kill -9 tests and bench/remote.py).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import io
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from tests.support.fakes import image_key

MODEL = "microsoft/Phi-3.5-vision-instruct"
#: Width of an image the server refuses with a 400 that names the image.
REFUSED_WIDTH = 13
#: The caption ``huge`` answers.
HUGE_CAPTION_BYTES = 20 * 1024 * 1024


class FakeVLLM:
    def __init__(
        self,
        *,
        port: int = 0,
        model: str = MODEL,
        latency: float = 0.0,
        limit: int | None = None,
        api_key: str | None = None,
        retry_after: str = "1",
        slow_seconds: float = 5.0,
        drip_seconds: float = 1.0,
        tls: tuple[Path, Path] | None = None,
        trust_request_mm_kwargs: bool = False,
    ) -> None:
        self.model = model
        # vLLM (0.32) refuses per-request mm_processor_kwargs unless started with
        # --trust-request-mm-kwargs; so does this stand-in, unless told the same.
        self.trust_request_mm_kwargs = trust_request_mm_kwargs
        self.refuse_parameter: str | None = None  # a request field answered with vLLM's 400 naming it
        self.latency = latency
        self.limit = limit
        self.api_key = api_key
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.drip_seconds = drip_seconds
        self.captions: dict[str, tuple[str, int]] = {}  # image key -> (caption, completion_tokens)
        self.sent: collections.Counter[str] = collections.Counter()  # image key -> chat requests
        self._image_actions: dict[str, collections.deque[str] | str] = {}
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.bodies: list[dict[str, Any]] = []  # chat requests, the image's data URL cut short
        self.answered: collections.Counter[str] = collections.Counter()  # image key -> 200s sent
        self.statuses: collections.Counter[int] = collections.Counter()
        self._actions: collections.deque[str] = collections.deque()
        self._connections: set[socket.socket] = set()
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.fake = self
        self.scheme = "http"
        if tls is not None:  # (certificate, key): https on the same port
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return (
            f"{self.scheme}://localhost:{self.port}/v1"
            if self.scheme == "https"
            else f"http://127.0.0.1:{self.port}/v1"
        )

    def start(self) -> FakeVLLM:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away as a crashed server does: the listener and every open connection closed."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def fail(self, action: str, n: int = 1) -> None:
        with self.lock:
            self._actions.extend([action] * n)

    def for_image(self, key: str, action: str, n: int | None = None) -> None:
        """``action`` for the next ``n`` requests of the image ``key``, or for every one."""
        with self.lock:
            if n is None:
                self._image_actions[key] = action
            else:
                queued = self._image_actions.setdefault(key, collections.deque())
                assert isinstance(queued, collections.deque)
                queued.extend([action] * n)

    def next_action(self, key: str | None = None) -> str | None:
        with self.lock:
            if key is not None:
                self.sent[key] += 1
                mine = self._image_actions.get(key)
                if isinstance(mine, str):
                    return mine
                if mine:
                    return mine.popleft()
            return self._actions.popleft() if self._actions else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    fake: FakeVLLM

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (a timeout test) or a connection dropped on purpose


#: vLLM 0.32's answer to a request with mm_processor_kwargs, word for word.
MM_KWARGS_REFUSED = (
    "Per-request mm_processor_kwargs are disabled by default because they can change multimodal "
    "preprocessing resource usage. Start the server with --trust-request-mm-kwargs only when clients "
    "are trusted. (parameter=mm_processor_kwargs)"
)


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves vLLM
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.fake.lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake.lock:
            self.server.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        with self.server.fake.lock:
            self.server.fake.statuses[status] += 1

    def _authorised(self) -> bool:
        key = self.server.fake.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, {"error": "Unauthorized"})  # what vLLM's --api-key middleware answers
        return False

    def do_GET(self) -> None:
        fake = self.server.fake
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            if self._authorised():
                model = {"id": fake.model, "object": "model", "created": int(time.time()), "owned_by": "vllm"}
                self._send(200, {"object": "list", "data": [{**model, "root": fake.model, "max_model_len": 4096}]})
        else:
            self._send(404, _error("Not Found", "NotFoundError", 404))

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            self._send(404, _error("Not Found", "NotFoundError", 404))
            return
        if not self._authorised():
            return
        with fake.lock:
            fake.active += 1
            fake.max_active = max(fake.max_active, fake.active)
            over = fake.limit is not None and fake.active > fake.limit
        try:
            if over:
                self._send(429, _error("Too many requests", "TooManyRequests", 429), {"Retry-After": fake.retry_after})
                return
            self._chat(raw)
        finally:
            with fake.lock:
                fake.active -= 1

    def _chat(self, raw: bytes) -> None:
        fake = self.server.fake
        try:
            body = json.loads(raw)
            if body["model"] != fake.model:
                message = f"The model `{body['model']}` does not exist."
                self._send(404, _error(message, "NotFoundError", 404))
                return
            (turn,) = body["messages"]
            assert turn["role"] == "user"
            parts = {p["type"]: p for p in turn["content"]}
            prompt = parts["text"]["text"]
            url = parts["image_url"]["image_url"]["url"]
            head, _, payload = url.partition(",")
            assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
            image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
            image.load()
        except Exception as e:
            self._send(400, _error(f"invalid request: {type(e).__name__}: {e}", "BadRequestError", 400))
            return
        with fake.lock:
            parts["image_url"]["image_url"]["url"] = url[:40]
            fake.bodies.append(body)
        if fake.refuse_parameter is not None and fake.refuse_parameter in body:
            message = f"{fake.refuse_parameter} is not supported by this server"
            self._send(400, {"error": {**_error(message, "BadRequestError", 400), "param": fake.refuse_parameter}})
            return
        if "mm_processor_kwargs" in body and not fake.trust_request_mm_kwargs:
            self._send(
                400, {"error": {**_error(MM_KWARGS_REFUSED, "BadRequestError", 400), "param": "mm_processor_kwargs"}}
            )
            return
        rgb = image.convert("RGB")
        key = image_key(rgb)
        action = fake.next_action(key)
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action in ("503", "429"):
            self._send(
                int(action), _error("busy", "ServiceUnavailable", int(action)), {"Retry-After": fake.retry_after}
            )
            return
        if action == "500":
            self._send(500, _error("EngineCore encountered an issue", "InternalServerError", 500))
            return
        if action == "slow":
            time.sleep(fake.slow_seconds)
        if image.width == REFUSED_WIDTH:
            message = "Failed to load image: the image is too large for this model (13 x 13 crops asked)"
            self._send(400, _error(message, "BadRequestError", 400))
            return
        if fake.latency:
            time.sleep(fake.latency)
        if action == "malformed":
            self._send(200, None, raw=b'{"id": "chatcmpl-1", "choices": [')
            return
        if action == "endless":
            self._endless()
            return
        text, tokens = fake.captions.get(key, (f"A {rgb.width}x{rgb.height} test image {key}.", 7))
        if action == "huge":
            text, tokens = "A" * HUGE_CAPTION_BYTES, body["max_tokens"]
        with fake.lock:
            fake.answered[key] += 1
        reply = {
            "id": f"chatcmpl-{key}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": fake.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": 800 + len(prompt),
                "total_tokens": 800 + len(prompt) + tokens,
                "completion_tokens": tokens,
            },
            "prompt_logprobs": None,
        }
        if action in ("reset", "drip", "drip_head"):
            self._misdeliver(action, json.dumps(reply).encode())
            return
        self._send(200, reply)

    def _misdeliver(self, action: str, data: bytes) -> None:
        """A 200 that never arrives whole: cut by a TCP reset, or dripped a byte at a time."""
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        self.close_connection = True
        if action == "reset":
            self.wfile.write(head.encode() + data[: len(data) // 2])
            # SO_LINGER 0: close() sends a RST, as a proxy or a crashing worker does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if action == "drip":
            self.wfile.write(head.encode())
            head = ""
        for byte in head.encode() + data:
            try:
                self.wfile.write(bytes([byte]))
            except OSError:
                return  # the client gave up
            time.sleep(self.server.fake.drip_seconds)

    def _endless(self) -> None:
        """A chunked 200 that never ends, until the client goes away."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"A" * 65536
        try:
            while True:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            return


def started(servers: list[FakeVLLM], **kw: Any) -> FakeVLLM:
    """A stand-in started and added to ``servers`` (the test's fixture stops them). It takes
    num_crops per request (vLLM started with --trust-request-mm-kwargs) unless told otherwise,
    so a test sees every request the way phicapd first sends it; the refusal has tests of its own."""
    kw.setdefault("trust_request_mm_kwargs", True)
    server = FakeVLLM(**kw).start()
    servers.append(server)
    return server


def spawn(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """This server in a process of its own (one a test can kill -9): (process, base URL)."""
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.openai_server", *args],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default=MODEL)
    args = p.parse_args()
    fake = FakeVLLM(port=args.port, latency=args.latency, limit=args.limit, model=args.model)
    print(fake.port, flush=True)
    try:
        fake.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
