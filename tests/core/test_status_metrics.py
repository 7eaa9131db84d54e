"""Status for people (``progress``) and /metrics from prometheus_client (issue 13, item 8)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from phicapd.control.client import ControlClient, RequestFailed
from phicapd.pipeline.journal import Fingerprint, NewWork
from phicapd.service import Daemon
from tests.core.test_blank_caption import BlankFake, blank_captioner
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image, write_unique_png
from tests.support.metrics import sample, samples


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _roots(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    root = tmp_path / "in"
    root.mkdir()
    return root, [write_unique_png(root / f"{i:03}.png", i) for i in range(n)]


def test_progress_gives_backlog_rate_eta_and_failures_by_code(tmp_path: Path) -> None:
    root, keys = _roots(tmp_path, 40)
    fake = blank_captioner(BlankFake, "", {keys[0]})
    fake.max_batch, fake.latency = 2, 0.05  # type: ignore[attr-defined]
    settings = settings_for(tmp_path, [root], extra="[model]\nmax_batch = 2\n")
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["done"] >= 6, 20, "some captions")
        daemon.api.pause()
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.busy_since is None, 10, "the model idle")
        paused = ControlClient(settings.control.socket, timeout=10).status().model_dump()["progress"]
        daemon.api.resume()
        wait_for(
            lambda: daemon.store.counts()["failed"] == 1 and daemon.api.status()["progress"]["backlog"] == 0, 30, "done"
        )
        done = ControlClient(settings.control.socket, timeout=10).status().model_dump()["progress"]
    assert 0 < paused["backlog"] < 40 and paused["images_per_second"] > 0
    assert paused["eta_seconds"] is None and paused["no_eta"] == "paused"  # no estimate while paused
    assert 0 < paused["rate_window_seconds"] <= 300  # the busy seconds behind the rate
    assert done["backlog"] == 0 and done["eta_seconds"] == 0
    assert done["failures_by_code"] == {"caption_empty": 1}


def test_progress_before_anything_was_captioned_has_no_eta(tmp_path: Path) -> None:
    root, _ = _roots(tmp_path, 3)
    settings = settings_for(tmp_path, [root])
    daemon = Daemon(settings, lambda _s: FakeCaptioner())  # not started: loading, nothing captioned
    try:
        images = sorted(root.iterdir())
        daemon.store.enqueue_many(NewWork(p, root, Fingerprint(1, i, i)) for i, p in enumerate(images))
        progress = daemon.api.status()["progress"]
    finally:
        daemon.store.close()
    assert progress["backlog"] == 3 and progress["images_per_second"] == 0
    assert progress["eta_seconds"] is None and progress["failures_by_code"] == {}
    assert progress["no_eta"] == "no_rate"


def test_progress_counts_images_in_a_retry_back_off_apart(tmp_path: Path) -> None:
    from phicapd.pipeline.journal import Failure

    root, _ = _roots(tmp_path, 3)
    settings = settings_for(tmp_path, [root])
    settings.scheduler.retry_backoff_seconds = 60.0
    daemon = Daemon(settings, lambda _s: FakeCaptioner())  # not started: nothing runs the jobs
    try:
        images = sorted(root.iterdir())
        daemon.store.enqueue_many(NewWork(p, root, Fingerprint(1, i, i)) for i, p in enumerate(images))
        [job] = daemon.store.claim(1)
        daemon.store.finish_many([], [Failure(job.id, "caption_failed", "the model failed", retryable=True)])
        progress = daemon.api.status()["progress"]
    finally:
        daemon.store.close()
    assert (progress["backlog"], progress["runnable"], progress["retrying"]) == (3, 2, 1)
    assert 55 < progress["next_retry_in_seconds"] <= 60


def test_metrics_are_prometheus_text_with_histograms_failures_and_the_old_names(tmp_path: Path) -> None:
    root, keys = _roots(tmp_path, 5)
    blank = unique_image(99, (16, 16))
    fake = blank_captioner(BlankFake, " ", {keys[0], image_key(blank)})
    settings = settings_for(tmp_path, [root])
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: daemon.store.counts()["failed"] == 1 and daemon.store.counts()["done"] == 4, 30, "the root")
        client = ControlClient(settings.control.socket, timeout=10)
        client.caption_bytes(_png(unique_image(7, (16, 16))), name="ok.png")
        with pytest.raises(RequestFailed):
            client.caption_bytes(_png(blank), name="blank.png")
        client.status()

        def observed() -> bool:
            # A reply can reach the client a moment before the server and scheduler count it.
            text = client.metrics()
            captions = sample(text, "phicapd_captions_total")
            requests = [
                sample(text, "phicapd_control_request_seconds_count", endpoint=e) for e in ("/v1/caption", "/v1/status")
            ]
            return captions == 5 and requests == [2, 1]

        wait_for(observed, 10, "the requests to be counted")
        text = client.metrics()
    samples(text)  # the whole answer (the daemon's and the server's registries) parses as the text format
    # The names dashboards already use.
    assert sample(text, "phicapd_up") == 1
    assert sample(text, "phicapd_jobs", state="done") == 4 and sample(text, "phicapd_jobs", state="failed") == 1
    assert sample(text, "phicapd_queue_depth", lane="interactive") == 0
    assert sample(text, "phicapd_captions_total") == 5 and sample(text, "phicapd_batches_total") >= 1
    assert sample(text, "phicapd_images_per_second") is not None
    assert sample(text, "phicapd_control_requests_total", status="200") >= 2
    assert sample(text, "phicapd_control_connections") is not None
    # New: latency histograms, failures by code, backlog, the model.
    assert sample(text, "phicapd_caption_seconds_count", lane="background") == 4
    assert sample(text, "phicapd_caption_seconds_count", lane="interactive") == 1
    assert sample(text, "phicapd_caption_seconds_bucket", lane="background", le="+Inf") == 4
    assert sample(text, "phicapd_failures_total", lane="background", code="caption_empty") == 3  # max_attempts
    assert sample(text, "phicapd_failures_total", lane="interactive", code="caption_empty") == 1
    assert sample(text, "phicapd_failed_jobs", code="caption_empty") == 1
    assert sample(text, "phicapd_backlog") == 0 and sample(text, "phicapd_eta_seconds") == 0
    assert sample(text, "phicapd_model_loaded") == 1
    assert sample(text, "phicapd_model_info", identity="fake@test") == 1
    assert sample(text, "phicapd_control_request_seconds_count", endpoint="/v1/caption") == 2
    assert sample(text, "phicapd_control_request_seconds_count", endpoint="/v1/status") == 1


def test_engine_gauges_come_from_the_model_description(tmp_path: Path) -> None:
    class Described(FakeCaptioner):
        def describe(self) -> dict[str, object]:
            return {"device": "cuda:0", "engine": {"decode": "cuda-graphs", "oom_events": 2, "kv_pool_bytes": 10**9}}

    settings = settings_for(tmp_path, [])
    with running_daemon(settings, Described()):
        text = ControlClient(settings.control.socket, timeout=10).metrics()
    assert sample(text, "phicapd_engine_oom_events") == 2 and sample(text, "phicapd_engine_kv_pool_bytes") == 10**9
    assert sample(text, "phicapd_model_info", device="cuda:0", identity="fake@test") == 1
    assert "phicapd_engine_decode" not in text  # not a number


def test_each_daemon_has_its_own_registry(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(settings_for(tmp_path / "a", []), lambda _s: FakeCaptioner())
    b = Daemon(settings_for(tmp_path / "b", []), lambda _s: FakeCaptioner())
    try:
        a.prometheus.observe_failure("background", "image_corrupt")
        a.prometheus.observe_caption("interactive", 0.2)
        assert sample(a.api.metrics(), "phicapd_failures_total", lane="background", code="image_corrupt") == 1
        assert sample(b.api.metrics(), "phicapd_failures_total", lane="background", code="image_corrupt") is None
        assert sample(b.api.metrics(), "phicapd_caption_seconds_count", lane="interactive") is None
    finally:
        a.store.close()
        b.store.close()
