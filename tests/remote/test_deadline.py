"""A remote request has one deadline, connect to last byte, and a drop or timeout that keeps
happening to one image is that image's failure, not its endpoint's (issue 18, item 4)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from phicapd.captioner import Caption, CaptionRequest
from phicapd.config import Settings
from phicapd.errors import PhicapError
from phicapd.pipeline.journal import State
from phicapd.remote.captioner import REMOTE_DROPPED, RemoteCaptioner, load_remote_captioner
from phicapd.remote.chat_api import Http, Kind, RemoteFailure, Target, chat_body
from phicapd.remote.encode import data_url
from phicapd.service import load_model_captioner
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import image_key, unique_image, write_unique_png
from tests.support.openai_server import MODEL, FakeVLLM, started

_server = started


def _settings(*urls: str, **remote: object) -> Settings:
    return Settings(
        model={"backend": "openai", "max_new_tokens": 40},
        remote={"endpoints": list(urls), "image_format": "png", **remote},
    )


def _outcomes(c: RemoteCaptioner, requests: list[CaptionRequest]) -> dict[str, Caption | PhicapError]:
    """Every request through the stream, as the scheduler drives it: image key -> outcome."""
    todo = list(requests)
    out: dict[str, Caption | PhicapError] = {}

    def take(room: int, idle: bool) -> list[CaptionRequest]:
        taken, todo[:] = todo[:room], todo[room:]
        return taken

    def deliver(request: CaptionRequest, outcome: Caption | PhicapError) -> None:
        out[image_key(request.image)] = outcome

    deadline = time.monotonic() + 30
    while len(out) < len(requests) and time.monotonic() < deadline:
        c.stream(take, deliver)
    return out


@pytest.mark.parametrize("action", ["drip", "drip_head"])
def test_a_reply_dripping_at_one_byte_a_second_ends_at_timeout_seconds(servers: list[FakeVLLM], action: str) -> None:
    s = _server(servers, drip_seconds=1.0)
    image = unique_image(1, (16, 12))
    s.for_image(image_key(image), action)
    body = chat_body(
        model=MODEL,
        prompt="Describe it.",
        image_url=data_url(image, fmt="png"),
        max_tokens=40,
        temperature=0.0,
        top_p=1.0,
        num_crops=None,
    )
    # 1.5 s: longer than the gap between two bytes, so only a deadline for the whole request ends it.
    http = Http(timeout=1.5, connect_timeout=1.0)
    outcome: list[BaseException | float] = []

    def send() -> None:
        started = time.monotonic()
        try:
            http.request(Target.parse(s.url), "POST", "/chat/completions", body)
        except RemoteFailure as e:
            outcome.extend([e, time.monotonic() - started])

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    worker.join(5)
    try:
        assert not worker.is_alive(), "the request outlived its deadline"
    finally:
        http.abort()
    failure, elapsed = outcome
    assert isinstance(failure, RemoteFailure) and failure.kind is Kind.TIMEOUT
    assert "within 1.5 s" in str(failure)
    assert 1.5 <= elapsed < 1.9  # type: ignore[operator]


@pytest.mark.parametrize("action", ["reset", "drip"])
def test_an_image_the_server_keeps_dropping_is_that_images_failure_and_the_endpoint_stays_up(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner], action: str
) -> None:
    s = _server(servers, drip_seconds=0.2)
    # A trip would keep the endpoint out for 30 s: the other images would not be answered in time.
    c = load_remote_captioner(_settings(s.url, timeout_seconds=1, probe_interval_seconds=30))
    captioners.append(c)
    requests = [CaptionRequest(unique_image(i, (16, 12)), "Describe it.", 40) for i in range(12)]
    bad = image_key(requests[0].image)
    s.for_image(bad, action)
    outcomes = _outcomes(c, requests)
    failure = outcomes.pop(bad)
    assert isinstance(failure, PhicapError) and failure.code == REMOTE_DROPPED and failure.retryable
    assert s.url in str(failure)
    assert all(isinstance(o, Caption) for o in outcomes.values()) and len(outcomes) == 11
    assert s.sent[bad] == 2  # once may be anyone's, twice while others are answered is the image's
    endpoint = c.describe()["endpoints"][0]
    assert endpoint["up"] and endpoint["reason"] is None
    assert endpoint["errors_by_kind"] == {"dropped" if action == "reset" else "timeout": 2}


def test_a_lone_image_dropped_twice_is_judged_by_a_probe_image(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers)
    c = load_remote_captioner(_settings(s.url, probe_interval_seconds=30))
    captioners.append(c)
    request = CaptionRequest(unique_image(1, (16, 12)), "Describe it.", 40)
    s.for_image(image_key(request.image), "reset")
    [outcome] = _outcomes(c, [request]).values()
    assert isinstance(outcome, PhicapError) and outcome.code == REMOTE_DROPPED
    assert s.sent[image_key(request.image)] == 2
    probes = [b for b in s.bodies if b["max_tokens"] == 1]
    assert len(probes) == 1  # nothing else was answered between the two drops: one probe image asked
    assert c.pool.endpoints[0].up


def test_a_server_that_drops_every_image_is_the_endpoints_failure(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers)
    c = load_remote_captioner(_settings(s.url, probe_interval_seconds=30))
    captioners.append(c)
    request = CaptionRequest(unique_image(1, (16, 12)), "Describe it.", 40)
    s.fail("reset", 3)  # the image, again, and the probe image
    results: list[Caption] = []
    worker = threading.Thread(target=lambda: results.extend(c.caption([request])), daemon=True)
    worker.start()
    wait_for(lambda: not c.pool.endpoints[0].up, 10, "the endpoint to be taken out")
    assert "probe image" in (c.pool.endpoints[0].reason or "")
    c.pool.probe(c.pool.endpoints[0])  # it answers again: the image was never counted
    worker.join(10)
    assert [r.text for r in results] == [f"A 16x12 test image {image_key(request.image)}."]


def _remote(url: str, extra: str = "") -> str:
    return (
        '[model]\nbackend = "openai"\n'
        f'[remote]\nendpoints = ["{url}"]\nimage_format = "png"\n'
        "probe_interval_seconds = 30\ninitial_in_flight = 4\nmax_in_flight = 4\n" + extra
    )


def test_the_daemon_parks_an_image_the_server_keeps_resetting_and_captions_the_rest(
    tmp_path: Path, servers: list[FakeVLLM]
) -> None:
    s = _server(servers, latency=0.02)
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(s.url, "timeout_seconds = 2\n"))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        bad = write_unique_png(root / "bad.png", 0)
        s.for_image(bad, "reset")
        for i in range(1, 21):
            write_unique_png(root / f"img{i:02d}.png", i)
        wait_for(lambda: is_settled(daemon) and len(list(root.glob("*.txt"))) == 20, 20, "20 sidecars")
        job = daemon.store.get(root / "bad.png")
        endpoint = daemon.api.status()["model"]["endpoints"][0]
    assert job is not None and job.state is State.FAILED
    assert job.error_code == REMOTE_DROPPED and job.attempts == settings.scheduler.max_attempts
    assert s.sent[bad] == 2 * settings.scheduler.max_attempts  # bounded: never sent for ever
    assert not (root / "bad.txt").exists()
    assert endpoint["up"] and endpoint["errors_by_kind"] == {"dropped": s.sent[bad]}


def test_retries_due_are_sent_while_slow_requests_hold_other_slots(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    s = _server(servers, drip_seconds=0.5)
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(s.url, "timeout_seconds = 3\n"))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        slow = [write_unique_png(root / f"slow{i}.png", 100 + i) for i in range(2)]
        for key in slow:
            s.for_image(key, "drip")  # each holds a slot until its deadline
        wait_for(lambda: s.active == 2, 10, "the slow requests on the wire")
        started = time.monotonic()
        bad = write_unique_png(root / "bad.png", 0)
        s.for_image(bad, "reset")
        retry = write_unique_png(root / "retry.png", 1)
        s.for_image(retry, "reset", 2)  # dropped twice: back to the journal, due again 0.2 s later
        wait_for(lambda: (root / "retry.txt").exists(), 10, "the retried image's sidecar")
        elapsed = time.monotonic() - started
        print(f"retried image captioned {elapsed:.2f} s after it was written")
        job = daemon.store.get(root / "retry.png")
        assert s.active >= 2  # the slow requests still hold their slots
    assert job is not None and job.attempts == 1  # it failed once and was retried
    assert elapsed < 2.5  # before the slow requests' deadline: not after them, nor after 30 s of the endpoint out
