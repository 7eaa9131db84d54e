"""The control API apart from the lifecycle: a stand-in answers while the model loads, and the
whole API takes over once the pipeline runs, with no request lost in between."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from phicapd.config import Settings
from phicapd.control.client import ControlClient, RequestFailed
from phicapd.control_api import ControlApi, LoadingApi
from phicapd.service import Daemon
from tests.support.daemon import settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class SlowWarmUp(FakeCaptioner):
    """Loaded at once; its warm-up waits for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.warming = threading.Event()
        self.warmed = threading.Event()

    def warm_up(self) -> None:
        self.warming.set()
        assert self.warmed.wait(30), "the test never let the warm-up finish"


@contextmanager
def loading_daemon(settings: Settings, captioner: FakeCaptioner, loaded: threading.Event) -> Iterator[Daemon]:
    """The daemon in a thread, its model loading until ``loaded`` is set."""

    def factory(_settings: Settings) -> FakeCaptioner:
        assert loaded.wait(30), "the test never let the model load"
        return captioner

    daemon = Daemon(settings, factory)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run(install_signals=False)), daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        loaded.set()
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive() and result == [0]


def test_while_the_model_loads_the_journal_answers_and_the_model_endpoints_say_not_ready(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root])
    loaded = threading.Event()
    with loading_daemon(settings, FakeCaptioner(), loaded) as daemon:
        wait_for(settings.control.socket.exists, 10, "the socket")
        client = ControlClient(settings.control.socket, timeout=10)
        assert isinstance(daemon.api, LoadingApi)
        status = client.status().model_dump()
        assert status["state"] == "loading" and status["model"]["loaded"] is False
        assert status["model"]["loading"].startswith("loading the model from ")
        health = client.health_reply()
        assert (health.ready, health.state, health.reason) == (False, "loading", status["model"]["loading"])
        assert client.failures() == [] and client.retry() == 0
        policy = client.sidecar_policy(str(root / "a.png"))
        assert policy is not None and policy.root is not None and policy.root.path == str(root)
        for ask in (client.stale, client.recaption_stale):
            with pytest.raises(RequestFailed) as failed:
                ask()
            assert (failed.value.code, failed.value.retryable) == ("not_ready", True)
        assert not daemon.is_ready()


def test_a_caption_asked_while_the_model_loads_is_answered_by_the_whole_api(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [])
    loaded, waiting = threading.Event(), threading.Event()
    replies: list[Any] = []
    with loading_daemon(settings, FakeCaptioner(), loaded) as daemon:
        stand_in_wait = daemon.loading_api.wait_ready

        def wait_ready(timeout: float) -> bool:  # the server waits for the model on the stand-in
            waiting.set()
            return stand_in_wait(timeout)

        daemon.loading_api.wait_ready = wait_ready  # type: ignore[method-assign]
        wait_for(settings.control.socket.exists, 10, "the socket")
        client = ControlClient(settings.control.socket, timeout=30)
        asking = threading.Thread(
            target=lambda: replies.append(client.caption_bytes(_png(unique_image(3)), name="early.png"))
        )
        asking.start()
        assert waiting.wait(10), "the request never waited for the model"
        loaded.set()
        asking.join(30)
        assert isinstance(daemon.api, ControlApi) and daemon.is_ready()
    assert [r.caption for r in replies] == [f"A 8x8 test image {image_key(unique_image(3))}."]


def test_status_shows_the_loaded_model_while_it_warms_up(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [])
    captioner, loaded = SlowWarmUp(), threading.Event()
    loaded.set()
    with loading_daemon(settings, captioner, loaded) as daemon:
        assert captioner.warming.wait(10)
        status = daemon.api.status()
        assert status["state"] == "loading"
        assert status["model"] == {
            "source": status["model"]["source"],
            "loaded": True,
            "identity": "fake@test",
            "max_batch": 16,
        }
        captioner.warmed.set()
        wait_for(daemon.is_ready, 10, "the daemon to be ready")
        assert daemon.api.status()["model"]["max_batch"] == 16  # now the scheduler's


def test_a_pause_asked_while_the_model_loads_holds_the_backlog_once_it_is_ready(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    unique_image(5).save(root / "waiting.png")
    settings = settings_for(tmp_path, [root])
    captioner, loaded = FakeCaptioner(), threading.Event()
    with loading_daemon(settings, captioner, loaded) as daemon:
        wait_for(settings.control.socket.exists, 10, "the socket")
        client = ControlClient(settings.control.socket, timeout=10)
        client.pause()
        loaded.set()
        wait_for(daemon.is_ready, 10, "the daemon to be ready")
        assert daemon.api.status()["state"] == "paused"
        wait_for(lambda: daemon.store.counts()["pending"] == 1, 10, "the start-up scan to queue the image")
        time.sleep(0.5)  # time enough for a running scheduler to take it (it does, without the pause)
        assert daemon.store.counts()["pending"] == 1 and not captioner.calls
        client.resume()
        wait_for(lambda: (root / "waiting.txt").exists(), 10, "the caption after the resume")
