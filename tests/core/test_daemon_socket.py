"""The daemon behind its socket: hostile uploads never hurt it, socket requests jump the backlog."""

from __future__ import annotations

import io
import itertools
import resource
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from phicapd.captioner import Caption
from phicapd.config import load_settings
from phicapd.control.client import ControlClient, RequestFailed, RequestRejected
from tests.support.daemon import running_daemon, settings_for, wait_for, write_config
from tests.support.fakes import FakeCaptioner, StreamingFakeCaptioner, image_key, unique_image, write_unique_png
from tests.support.metrics import sample


def _png(image: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def hostile_inputs() -> dict[str, bytes]:
    photo = Image.effect_noise((64, 48), 40).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    frames = [Image.new("P", (16, 16), i % 2) for i in range(50)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "zero.jpg": b"",
        "text.jpg": b"hello, this is not an image\n" * 10,
        "eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "pdf.jpg": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
        "truncated.jpg": _jpeg(photo)[:300],
        "bomb.png": _png(Image.new("1", (20000, 20000))),
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "deep.png": _png(Image.new("I;16", (16, 16), 40000)),
        "rgba.png": _png(Image.new("RGBA", (16, 16), (255, 0, 0, 0))),
        "palette.png": _png(palette, transparency=1),
        "animated.gif": gif.getvalue(),
        "exif6.jpg": _jpeg(Image.new("RGB", (40, 20), "blue"), exif=exif),
    }


REJECTED = {"zero.jpg", "text.jpg", "eps.jpg", "pdf.jpg", "truncated.jpg", "bomb.png"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _backlog(root: Path, n: int) -> Path:
    """A watched root holding ``n`` unique images to caption."""
    root.mkdir()
    for i in range(n):
        write_unique_png(root / f"b{i:03d}.png", i)
    return root


def test_hostile_uploads_get_codes_or_captions_and_the_daemon_stays_up(tmp_path: Path) -> None:
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, fake):
        client = ControlClient(settings.control.socket, timeout=30)
        before = _rss_mb()
        for _ in range(3):
            for name, data in hostile_inputs().items():
                if name in REJECTED:
                    with pytest.raises(RequestRejected) as err:
                        client.caption_bytes(data, name=name, prompt=None, max_new_tokens=None)
                    if name == "zero.jpg":  # refused by the server before it reaches the decoder
                        assert err.value.code == "image_empty" and f"{name}: the file is empty" in str(err.value)
                        continue
                    assert err.value.code.startswith("image_"), (name, err.value.code)
                    assert name in str(err.value)
                else:
                    reply = client.caption_bytes(data, name=name, prompt=None, max_new_tokens=None)
                    assert "test image" in reply.caption
        assert client.health()
        # The EXIF-rotated image reached the model upright: 20x40, not 40x20.
        reply = client.caption_bytes(hostile_inputs()["exif6.jpg"], name="exif6.jpg", prompt=None, max_new_tokens=None)
        assert reply.caption.startswith("A 20x40 ")
        assert _rss_mb() - before < 500
        assert client.status().state == "ready"


def test_socket_request_is_answered_ahead_of_a_running_backlog(tmp_path: Path) -> None:
    root = _backlog(tmp_path / "in", 400)
    fake = FakeCaptioner(max_batch=8, latency=0.05)  # 400 images = 50 batches = 2.5 s of "GPU"
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 8\n")
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] >= 40, 30, "the backlog to be running")
        client = ControlClient(settings.control.socket, timeout=30)
        latencies = []
        for i in range(5):
            started = time.monotonic()
            data = _png(unique_image(10_000 + i, (32, 32)))
            reply = client.caption_bytes(data, name=f"ask{i}.png", prompt=None, max_new_tokens=None)
            latencies.append(time.monotonic() - started)
            assert reply.caption.startswith("A 32x32 ")
        remaining = daemon.store.counts()["pending"]
    # Each answer waits for at most the batch already on the model plus its own.
    assert max(latencies) < 1.0, latencies  # the backlog behind them is ~2 s of model time
    assert remaining > 0, "the backlog should still have been running"


def test_with_a_streaming_model_a_socket_request_joins_the_running_batch(tmp_path: Path) -> None:
    root = _backlog(tmp_path / "in", 300)
    # 4 rows, 20 steps of 5 ms per caption: the backlog takes ~5 s of "GPU" time.
    fake = StreamingFakeCaptioner(max_batch=4, steps=20, step_latency=0.005)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 4\n")  # interactive_slots = 1 by default
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] >= 30, 30, "the backlog to be running")
        client = ControlClient(settings.control.socket, timeout=30)
        asked, latencies = set(), []
        for i in range(5):
            image = unique_image(10_000 + i, (32, 32))
            asked.add(image_key(image))
            started = time.monotonic()
            reply = client.caption_bytes(_png(image), name=f"ask{i}.png", prompt=None, max_new_tokens=None)
            latencies.append(time.monotonic() - started)
            assert reply.caption.startswith("A 32x32 ")
        remaining = daemon.store.counts()["pending"]
    assert remaining > 0, "the backlog should still have been running"
    # Each request was admitted beside running background rows instead of waiting for them,
    assert all(fake.joined[key] >= 1 for key in asked), fake.joined
    # because background work never took the row kept for it.
    assert max(len(keys - asked) for keys in fake.running) == 3
    # While one was on the model no new background row started (their prefills would stall it).
    for before, after in itertools.pairwise(fake.running):
        if before & asked and before & asked <= after:
            assert not (after - before - asked), "background work joined a running socket request"
    assert max(latencies) < 0.6, latencies  # its own 20 steps (~0.1 s) plus a step and the socket


def test_bulk_socket_work_shares_the_model_with_the_backlog(tmp_path: Path) -> None:
    root = _backlog(tmp_path / "in", 300)
    fake = StreamingFakeCaptioner(max_batch=8, steps=40, step_latency=0.005)
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 8\n")
    images = [unique_image(20_000 + i, (32, 32)) for i in range(4)]
    asked = {image_key(image) for image in images}
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] >= 30, 30, "the backlog to be running")
        client = ControlClient(settings.control.socket, timeout=30)

        def ask(i: int) -> None:
            client.caption_bytes(_png(images[i]), name=f"bulk{i}.png", prompt=None, max_new_tokens=None)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    # More socket requests than reserved rows is bulk work (caption-dir): background rows keep
    # starting beside it instead of the model running half empty.
    joined = [
        after - before - asked
        for before, after in itertools.pairwise(fake.running)
        if len(before & asked) >= 2 and len(after & asked) >= 2
    ]
    assert any(joined), "no background row started while the socket requests ran"


def test_with_a_streaming_model_an_idle_request_does_not_wait_for_the_batch_window(tmp_path: Path) -> None:
    fake = StreamingFakeCaptioner(max_batch=4, steps=2, step_latency=0.001)
    # A long window: a batch-only model would hold a lone request for it, hoping for company.
    config = write_config(tmp_path, [])
    config.write_text(config.read_text().replace("batch_window_ms = 5", "batch_window_ms = 3000"))
    settings = load_settings(config)
    with running_daemon(settings, fake):
        client = ControlClient(settings.control.socket, timeout=30)
        started = time.monotonic()
        client.caption_bytes(_png(unique_image(7, (16, 16))), name="alone.png", prompt=None, max_new_tokens=None)
        assert time.monotonic() - started < 1.5


def test_concurrent_uploads_are_batched_together(tmp_path: Path) -> None:
    fake = FakeCaptioner(max_batch=16, latency=0.2)
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, fake):
        results: list[str] = []

        def ask(i: int) -> None:
            client = ControlClient(settings.control.socket, timeout=30)
            results.append(
                client.caption_bytes(_png(unique_image(i)), name=f"{i}.png", prompt=None, max_new_tokens=None).caption
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(results) == 12
    assert max(fake.batch_sizes) > 1, fake.batch_sizes


class _ImageServer:
    """A local HTTP server with one PNG, for caption-url through the real daemon."""

    def __init__(self, body: bytes) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cat.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("allowed", [True, False])
def test_caption_url_through_the_daemon_respects_the_address_policy(tmp_path: Path, allowed: bool) -> None:
    server = _ImageServer(_png(unique_image(7, (24, 16))))
    extra = '[fetch]\nallow_networks = ["127.0.0.1/32"]\n' if allowed else ""
    settings = settings_for(tmp_path, [], extra=extra)
    try:
        with running_daemon(settings, FakeCaptioner()):
            client = ControlClient(settings.control.socket, timeout=30)
            if allowed:
                reply = client.caption_url(server.url, prompt=None, max_new_tokens=None)
                assert reply.caption.startswith("A 24x16 ") and reply.url == server.url
            else:
                with pytest.raises(RequestRejected) as err:
                    client.caption_url(server.url, prompt=None, max_new_tokens=None)
                assert err.value.code == "url_address_refused"
                assert client.health()
    finally:
        server.close()


def test_a_model_that_fails_to_load_stops_the_daemon_cleanly(tmp_path: Path) -> None:
    from phicapd.errors import PhicapError
    from phicapd.service import Daemon

    def broken(_settings: object) -> FakeCaptioner:
        raise RuntimeError("CUDA driver version is insufficient")

    settings = settings_for(tmp_path, [])
    daemon = Daemon(settings, broken)
    with pytest.raises(PhicapError, match="CUDA driver version is insufficient") as err:
        daemon.run(install_signals=False)
    assert err.value.code == "model_load_failed"
    assert daemon.lifecycle.phase == "stopping"
    assert not settings.control.socket.exists()


def test_shutdown_finishes_the_batch_on_the_model_and_answers_queued_requests(tmp_path: Path) -> None:
    from phicapd.errors import PhicapError

    fake = FakeCaptioner(max_batch=1, latency=1.0)
    settings = settings_for(tmp_path, [], extra="[model]\nmax_batch = 1\n")
    with running_daemon(settings, fake) as daemon:
        first = daemon.scheduler.submit(_png(unique_image(1)), name="first.png")
        wait_for(lambda: daemon.scheduler.busy_since is not None, 10, "the first request on the model")
        queued = [daemon.scheduler.submit(_png(unique_image(i)), name=f"q{i}.png") for i in range(2, 5)]
        daemon.request_stop()
        assert first.result(timeout=10).text.startswith("A 8x8 ")
        for future in queued:
            with pytest.raises(PhicapError) as err:
                future.result(timeout=10)
            assert err.value.code == "shutting_down" and err.value.retryable


def test_a_socket_request_is_not_decoded_behind_the_backlogs_images(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, FakeCaptioner()) as daemon:
        decode_file = daemon.scheduler.feeder.decode_file

        def slow_decode(path: Path):  # large photos: 0.3 s each on the two decode workers
            time.sleep(0.3)
            return decode_file(path)

        daemon.scheduler.feeder.decode_file = slow_decode
        for i in range(100):
            write_unique_png(root / f"b{i:03d}.png", i)
        wait_for(lambda: daemon.scheduler.lanes()["decoding"] >= 30, 30, "a queue of backlog decodes")
        started = time.monotonic()
        future = daemon.scheduler.submit(_png(unique_image(10_000, (32, 32))), name="ask.png")
        assert future.result(timeout=30).text.startswith("A 32x32 ")
        latency = time.monotonic() - started
    # Behind 30+ queued decodes of 0.3 s on two workers it would take 4.5 s or more.
    assert latency < 1.0, latency


def test_a_caption_slower_than_the_timeout_is_a_504(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHICAPD_CONTROL__CAPTION_TIMEOUT_SECONDS", "0.5")
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, FakeCaptioner(latency=2.0)):
        client = ControlClient(settings.control.socket, timeout=10)
        with pytest.raises(RequestFailed) as err:
            client.caption_bytes(_png(unique_image(1)), name="slow.png", prompt=None, max_new_tokens=None)
    assert (err.value.status, err.value.code, err.value.retryable) == (504, "caption_timeout", True)
    assert "slow.png" in err.value.message


def test_a_model_that_is_not_available_yet_is_loaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phicapd.errors import ModelUnavailable
    from phicapd.service import Daemon

    monkeypatch.setattr("phicapd.service.LOAD_RETRY_SECONDS", 0.05)
    attempts = []

    def flaky(_settings: object) -> FakeCaptioner:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ModelUnavailable("cannot fetch the model now: network is unreachable")
        return FakeCaptioner()

    daemon = Daemon(settings_for(tmp_path, []), flaky)
    thread = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        wait_for(daemon.is_ready, 10, "the third load to succeed")
        # Waits are lower bounds whatever the load (an early wake-up would be a bug): 0.05 s, then
        # double that. Comparing the measured gaps instead would count scheduling delays.
        assert attempts[1] - attempts[0] >= 0.05
        assert attempts[2] - attempts[1] >= 0.1  # the wait doubles
    finally:
        daemon.request_stop()
        thread.join(10)
    assert len(attempts) == 3 and not thread.is_alive()


def test_a_stop_while_waiting_for_the_model_is_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phicapd.errors import ModelUnavailable
    from phicapd.service import Daemon

    def down(_settings: object) -> FakeCaptioner:
        raise ModelUnavailable("the NVIDIA driver is not loaded yet")

    settings = settings_for(tmp_path, [])
    daemon = Daemon(settings, down)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run(install_signals=False)), daemon=True)
    thread.start()
    wait_for(lambda: settings.control.socket.exists(), 10, "the socket, up while the model is awaited")
    assert ControlClient(settings.control.socket).status().state == "loading"
    started = time.monotonic()
    daemon.request_stop()
    thread.join(5)
    assert result == [0] and time.monotonic() - started < 2  # not the 10 s wait
    assert not settings.control.socket.exists()


class PreparingFake(FakeCaptioner):
    """A backend with a CPU ``prepare`` step, like the native model: records the sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared_sizes: list[tuple[int, int]] = []
        self.held_sizes: list[tuple[int, int]] = []

    def prepare(self, image: Image.Image) -> tuple[int, int]:
        self.prepared_sizes.append(image.size)
        return image.size

    def caption(self, batch):
        self.held_sizes += [r.image.size for r in batch]
        return [Caption(f"prepared {r.prepared[0]}x{r.prepared[1]}", 3) for r in batch]


def test_a_huge_image_is_not_held_at_full_size_once_prepared(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = PreparingFake()
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        Image.new("RGB", (6000, 4000), (10, 200, 30)).save(root / "pano.png")
        wait_for(lambda: (root / "pano.txt").exists(), 30, "the caption")
        reply = daemon.scheduler.submit(_png(Image.new("RGB", (3000, 100), "red")), name="wide.png").result(10)
    assert (root / "pano.txt").read_text() == "prepared 6000x4000\n"  # the model saw all of it
    assert reply.text == "prepared 3000x100"
    assert fake.prepared_sizes == [(6000, 4000), (3000, 100)]
    assert fake.held_sizes == [(2000, 1334), (1500, 50)]  # what waits for the model is cut down


def test_a_gpu_that_is_not_usable_is_not_retried_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phicapd.errors import ModelUnavailable
    from phicapd.service import Daemon

    monkeypatch.setattr("phicapd.service.LOAD_RETRY_SECONDS", 0.05)
    attempts: list[float] = []

    def no_gpu(_settings: object) -> FakeCaptioner:
        attempts.append(time.monotonic())
        raise ModelUnavailable("model.device is 'cuda' but CUDA is not available (yet?)", code="gpu_unavailable")

    daemon = Daemon(settings_for(tmp_path, []), no_gpu)
    with pytest.raises(ModelUnavailable):  # exit 75 at once: only a new process sees a late driver
        daemon.run(install_signals=False)
    assert len(attempts) == 1


class GpuDescribed(FakeCaptioner):
    """What the native captioner reports about its device when it runs on a GPU."""

    def describe(self) -> dict[str, object]:
        gpu = {"name": "NVIDIA H200", "memory_allocated_bytes": 9_000_000_000}
        return {"device": "cuda:0", "gpu": gpu | {"memory_reserved_bytes": 10**10, "memory_total_bytes": 15 * 10**10}}


def test_status_and_metrics_with_a_gpu(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [])
    with running_daemon(settings, GpuDescribed()):
        client = ControlClient(settings.control.socket, timeout=10)
        status = client.status().model_dump()
        metrics = client.metrics()
    assert status["gpu"]["name"] == "NVIDIA H200" and status["model"]["device"] == "cuda:0"
    assert sample(metrics, "phicapd_gpu_memory_allocated_bytes") == 9_000_000_000
    assert sample(metrics, "phicapd_gpu_memory_total_bytes") == 150_000_000_000


def test_metrics_survive_a_backend_that_names_its_gpu_as_a_string(tmp_path: Path) -> None:
    class Named(FakeCaptioner):
        def describe(self) -> dict[str, object]:
            return {"gpu": "NVIDIA H200"}  # what the native captioner reported before: /metrics gave 500

    settings = settings_for(tmp_path, [])
    with running_daemon(settings, Named()):
        metrics = ControlClient(settings.control.socket, timeout=10).metrics()
    assert sample(metrics, "phicapd_up") == 1 and "phicapd_gpu_" not in metrics
