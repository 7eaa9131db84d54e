"""The remote backend against loopback servers that speak chat-completions as vLLM does."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from phicapd.captioner import Caption, CaptionRequest
from phicapd.config import Settings
from phicapd.errors import ConfigError, ModelUnavailable, PhicapError
from phicapd.remote.captioner import IMAGE_REJECTED, REMOTE_FAILED, RemoteCaptioner, load_remote_captioner
from phicapd.remote.chat_api import Kind, classify, retry_after
from phicapd.remote.encode import data_url
from tests.support.daemon import wait_for
from tests.support.fakes import image_key, unique_image
from tests.support.openai_server import REFUSED_WIDTH, FakeVLLM, started

_server = started


def _settings(*urls: str, **remote: object) -> Settings:
    return Settings(
        model={"backend": "openai", "max_new_tokens": 40},
        remote={"endpoints": list(urls), "image_format": "png", "probe_interval_seconds": 0.1, **remote},
    )


def _requests(n: int, start: int = 0) -> list[CaptionRequest]:
    return [CaptionRequest(unique_image(start + i, (16, 12)), "Describe it.", 40) for i in range(n)]


def _expected(request: CaptionRequest) -> str:
    return f"A 16x12 test image {image_key(request.image)}."


def _load(captioners: list[RemoteCaptioner], settings: Settings) -> RemoteCaptioner:
    c = load_remote_captioner(settings)
    captioners.append(c)
    return c


def test_request_and_reply_have_vllms_shape(servers: list[FakeVLLM], captioners: list[RemoteCaptioner]) -> None:
    s = _server(servers)
    c = _load(captioners, _settings(s.url))
    request = _requests(1)[0]
    [caption] = c.caption([request])
    assert caption == Caption(_expected(request), 7, backend="openai", endpoint=s.url, model=s.model)
    body = s.bodies[0]
    assert body["model"] == "microsoft/Phi-3.5-vision-instruct"
    assert body["max_tokens"] == 40 and body["temperature"] == 0.0
    assert body["mm_processor_kwargs"] == {"num_crops": 16}
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "image_url"]
    assert content[0]["text"] == "Describe it."
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_no_num_crops_when_asked_not_to_send_them(servers: list[FakeVLLM], captioners: list[RemoteCaptioner]) -> None:
    s = _server(servers)
    c = _load(captioners, _settings(s.url, send_num_crops=False))
    c.caption(_requests(1))
    assert "mm_processor_kwargs" not in s.bodies[0]


def test_a_server_that_refuses_num_crops_per_request_gets_requests_without_them(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    """vLLM's default (no --trust-request-mm-kwargs): its 400 is the endpoint's configuration,
    never the image's; the parameter is left out from then on, said once, shown in status."""
    s = _server(servers, trust_request_mm_kwargs=False)
    c = _load(captioners, _settings(s.url))
    requests = _requests(6)
    assert [x.text for x in c.caption(requests)] == [_expected(r) for r in requests]
    refused = [b for b in s.bodies if "mm_processor_kwargs" in b]
    # Only the requests on the wire before the first refusal came back carried it.
    assert 1 <= len(refused) <= c.remote.initial_in_flight
    assert len(s.bodies) == len(requests) + len(refused)  # each refused one sent again, once
    [endpoint] = c.describe()["endpoints"]
    assert endpoint["up"] and endpoint["omits"] == ["mm_processor_kwargs"]
    assert endpoint["errors_by_kind"] == {"unsupported": len(refused)}


def test_a_server_that_refuses_another_parameter_is_taken_out_not_the_images(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    """A refusal phicapd cannot work around: the endpoint goes out with the reason and stays out
    (no probe can see its flags change); its requests go to the other endpoint, uncounted."""
    bad = _server(servers, model="microsoft/Phi-3.5-vision-instruct")
    good = _server(servers)
    bad.refuse_parameter = "temperature"
    c = _load(captioners, _settings(bad.url, good.url, probe_interval_seconds=0.1))
    requests = _requests(6)
    assert [x.text for x in c.caption(requests)] == [_expected(r) for r in requests]
    time.sleep(0.3)  # several probe intervals: it is not let back in
    down = {e["url"]: e for e in c.describe()["endpoints"]}[bad.url]
    assert not down["up"] and "refuses the request as phicapd sends it" in down["reason"]
    assert "temperature" in down["reason"]


def test_images_are_reencoded_and_capped_in_pixels() -> None:
    big = Image.new("RGB", (4000, 3000), (10, 200, 30))
    url = data_url(big, fmt="jpeg", quality=95, max_pixels=1_000_000)
    head, _, payload = url.partition(",")
    assert head == "data:image/jpeg;base64"
    sent = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert sent.format == "JPEG" and sent.width * sent.height <= 1_000_000
    assert abs(sent.width / sent.height - 4 / 3) < 0.01
    small = unique_image(5, (20, 10))
    png = Image.open(io.BytesIO(base64.b64decode(data_url(small, fmt="png").partition(",")[2])))
    assert image_key(png.convert("RGB")) == image_key(small)  # lossless, pixels unchanged


def test_many_requests_in_flight_spread_over_endpoints(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    a, b = _server(servers, latency=0.1), _server(servers, latency=0.1)
    c = _load(captioners, _settings(a.url, b.url, initial_in_flight=4, max_in_flight=4))
    batch = _requests(32)
    started = time.monotonic()
    captions = c.caption(batch)
    elapsed = time.monotonic() - started
    assert [x.text for x in captions] == [_expected(r) for r in batch]
    assert a.max_active == 4 and b.max_active == 4
    assert {x.endpoint for x in captions} == {a.url, b.url}
    assert elapsed < 32 / 8 * 0.1 * 2  # 8 at once, not one after the other


def test_limit_grows_while_latency_holds_and_halves_on_429_with_retry_after(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers, latency=0.02, retry_after="0.5")
    c = _load(captioners, _settings(s.url, initial_in_flight=2, max_in_flight=8))
    c.caption(_requests(120))
    endpoint = c.pool.endpoints[0]
    assert endpoint.limit == 8  # grew from 2 while the latency held
    s.fail("429", 1)
    started = time.monotonic()
    assert len(c.caption(_requests(8, 100))) == 8  # the refused one was sent again
    assert time.monotonic() - started >= 0.45  # after the Retry-After
    assert endpoint.errors["overload"] == 1
    assert endpoint.limit < 8


def test_503_is_retried_not_failed(servers: list[FakeVLLM], captioners: list[RemoteCaptioner]) -> None:
    s = _server(servers, retry_after="0")
    c = _load(captioners, _settings(s.url))
    s.fail("503", 3)
    requests = _requests(2)
    assert [x.text for x in c.caption(requests)] == [_expected(r) for r in requests]
    assert s.statuses[503] == 3


def test_an_image_the_server_refuses_is_that_images_own_failure(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers)
    c = _load(captioners, _settings(s.url))
    bad = CaptionRequest(unique_image(1, (REFUSED_WIDTH, 13)), "Describe it.", 40)
    with pytest.raises(PhicapError) as info:
        c.caption([bad])
    assert info.value.code == IMAGE_REJECTED and not info.value.retryable
    assert "too large" in str(info.value)
    assert c.pool.endpoints[0].up  # the server is fine


def test_server_errors_are_retryable_never_a_bad_image(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers)
    c = _load(captioners, _settings(s.url, failures_to_trip=10))
    s.fail("500", 2)
    assert len(c.caption(_requests(1))) == 1  # two 500s, then a caption
    s.fail("malformed", 3)
    with pytest.raises(PhicapError) as info:
        c.caption(_requests(1, 10))
    assert info.value.code == REMOTE_FAILED and info.value.retryable
    assert "malformed" in str(info.value)


def test_dropped_and_slow_requests_go_to_the_other_endpoint(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    a, b = _server(servers, slow_seconds=3.0), _server(servers)
    c = _load(captioners, _settings(a.url, b.url, timeout_seconds=0.5, failures_to_trip=1, probe_interval_seconds=30))
    a.fail("drop", 1)
    # Alone on the wire (no other image answered meanwhile), a drop counts against the endpoint.
    first = _requests(1)
    assert [x.text for x in c.caption(first)] == [_expected(first[0])]
    assert not c.pool.endpoints[0].up and "dropped" in (c.pool.endpoints[0].reason or "")
    requests = _requests(6, 1)
    assert [x.text for x in c.caption(requests)] == [_expected(r) for r in requests]
    assert c.describe()["endpoints"][0]["up"] is False
    # The other one times out: its request is answered by the first, probed back in.
    c.pool.probe(c.pool.endpoints[0])
    b.fail("slow", 1)
    started = time.monotonic()
    assert [x.text for x in c.caption(_requests(4, 50))] == [_expected(r) for r in _requests(4, 50)]
    assert time.monotonic() - started < 2.5
    assert c.pool.endpoints[1].errors["timeout"] == 1


def test_error_bodies_and_retry_after_are_read_as_vllm_and_openai_write_them() -> None:
    vllm = b'{"object":"error","message":"The prompt is too long for the image","type":"BadRequestError","code":400}'
    assert classify(400, vllm).kind is Kind.IMAGE
    openai = b'{"error":{"message":"Invalid value for temperature","type":"invalid_request_error"}}'
    failure = classify(400, openai)
    assert failure.kind is Kind.REJECTED and "temperature" in str(failure)
    assert classify(401, b'{"error":"Unauthorized"}').kind is Kind.AUTH
    assert classify(404, b'{"object":"error","message":"The model `x` does not exist."}').kind is Kind.MODEL
    assert classify(502, b"<html>bad gateway</html>").kind is Kind.SERVER
    assert retry_after("7") == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after("soon") is None and retry_after("99999") == 300.0


def test_a_wrong_api_key_is_a_clear_config_error(servers: list[FakeVLLM], tmp_path: Path) -> None:
    s = _server(servers, api_key="right-key")
    key = tmp_path / "key"
    key.write_text("wrong-key\n")
    with pytest.raises(ConfigError) as info:
        load_remote_captioner(_settings(s.url, api_key_file=key))
    assert "API key was refused" in str(info.value) and "wrong-key" not in str(info.value)
    key.write_text("right-key\n")
    c = load_remote_captioner(_settings(s.url, api_key_file=key))
    try:
        assert len(c.caption(_requests(1))) == 1
    finally:
        c.close()


@pytest.mark.parametrize("content", [None, ""])
def test_an_unreadable_or_empty_key_file_is_a_config_error(
    servers: list[FakeVLLM], tmp_path: Path, content: str | None
) -> None:
    s = _server(servers)
    key = tmp_path / "key"
    if content is not None:
        key.write_text(content)
    with pytest.raises(ConfigError, match=str(key)):
        load_remote_captioner(_settings(s.url, api_key_file=key))


def test_a_server_with_another_model_is_a_clear_config_error(servers: list[FakeVLLM]) -> None:
    s = _server(servers, model="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ConfigError) as info:
        load_remote_captioner(_settings(s.url))
    assert "serves llava-hf/llava-1.5-7b-hf, not 'microsoft/Phi-3.5-vision-instruct'" in str(info.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_endpoint_answering_at_start_is_unavailable_and_one_down_is_probed_in(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ModelUnavailable) as info:
        load_remote_captioner(_settings(url))
    assert url in str(info.value) and "cannot connect" in str(info.value)
    up = _server(servers)
    c = _load(captioners, _settings(url, up.url))
    assert [e["up"] for e in c.describe()["endpoints"]] == [False, True]
    assert len(c.caption(_requests(3))) == 3
    _server(servers, port=port)  # the late one comes up: the prober lets it in
    wait_for(lambda: c.pool.endpoints[0].up, 5, "the endpoint to be probed in")


def test_all_endpoints_down_requests_wait_then_resume(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    a = _server(servers, latency=0.05)
    port = a.port
    c = _load(captioners, _settings(a.url))
    a.stop()
    servers.remove(a)
    requests = _requests(10)
    results: list[Caption] = []
    worker = threading.Thread(target=lambda: results.extend(c.caption(requests)))
    worker.start()
    wait_for(lambda: "waiting" in c.describe(), 5, "the backend to say it waits")
    assert "all endpoints are down" in c.describe()["waiting"]
    time.sleep(0.5)  # the outage goes on: nothing is failed meanwhile
    assert worker.is_alive()
    _server(servers, port=port)
    worker.join(10)
    assert [x.text for x in results] == [_expected(r) for r in requests]
    assert "waiting" not in c.describe()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (openssl), and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {result.stderr.decode()[-200:]}")
    return cert, key


def test_tls_is_verified_by_default(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner], certificate: tuple[Path, Path]
) -> None:
    s = _server(servers, tls=certificate)
    assert s.url.startswith("https://localhost:")
    with pytest.raises(ConfigError) as info:
        load_remote_captioner(_settings(s.url))
    assert "TLS certificate is not trusted" in str(info.value) and "ca_file" in str(info.value)
    trusted = _load(captioners, _settings(s.url, ca_file=certificate[0]))
    assert len(trusted.caption(_requests(2))) == 2
    unverified = _load(captioners, _settings(s.url, tls_verify=False))
    assert len(unverified.caption(_requests(2, 5))) == 2


def test_close_aborts_requests_in_flight(servers: list[FakeVLLM]) -> None:
    s = _server(servers, slow_seconds=10.0)
    c = load_remote_captioner(_settings(s.url, timeout_seconds=60))
    s.fail("slow", 1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            c.caption(_requests(1))
        except PhicapError as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: s.active == 1, 5, "the request to be on the server")
    started = time.monotonic()
    c.close()
    worker.join(5)
    c._threads.shutdown(wait=True)  # the request's own thread: what the interpreter waits for at exit
    assert time.monotonic() - started < 2  # not the 10 s the server takes, nor the 60 s timeout
    assert [e.code for e in errors] == ["shutting_down"]  # type: ignore[attr-defined]


def test_the_scheduler_keeps_only_a_thumbnail_beside_the_data_url(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    from phicapd.pipeline.feeder import prepare_request

    s = _server(servers)
    c = _load(captioners, _settings(s.url))
    request = prepare_request(c, Image.new("RGB", (3000, 2000), (1, 2, 3)), "Describe it.", 40)
    assert max(request.image.size) <= 64
    sent = Image.open(io.BytesIO(base64.b64decode(request.prepared.partition(",")[2])))
    assert sent.width > 1000 and sent.width * sent.height <= 1344 * 1344  # the full image, capped, was sent


def test_the_limit_settles_near_what_a_saturated_server_takes(
    servers: list[FakeVLLM], captioners: list[RemoteCaptioner]
) -> None:
    s = _server(servers, latency=0.03, limit=3, retry_after="0")  # refuses a 4th request at once with a 429
    c = _load(captioners, _settings(s.url, initial_in_flight=2, max_in_flight=16))
    requests = _requests(150)
    assert [x.text for x in c.caption(requests)] == [_expected(r) for r in requests]  # every one, despite the 429s
    endpoint = c.pool.endpoints[0]
    assert s.statuses[429] > 0 and endpoint.errors["overload"] == s.statuses[429]
    assert endpoint.limit < 8  # halved back each time it went past what the server takes
    assert endpoint.up


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize("size", [(600, 400), (400, 600), (1411, 1411), (4000, 3000), (3000, 500), (50, 900), (8, 8)])
def test_an_image_is_sent_as_the_model_sees_it(size: tuple[int, int], num_crops: int) -> None:
    """What the server's HD transform makes of the sent PNG is, pixel for pixel, what phicapd's
    native engine makes of the decoded image: the same crops, so the same caption."""
    from phicapd.model.processing import preprocess_image

    image = unique_image(sum(size), size)
    sent = Image.open(io.BytesIO(base64.b64decode(data_url(image, num_crops=num_crops).partition(",")[2])))
    assert sent.format == "PNG"
    assert sent.size == image.size or sent.width * sent.height < image.width * image.height  # never larger
    native = preprocess_image(image, num_crops)
    served = preprocess_image(sent.convert("RGB"), num_crops)
    assert served.hd_size == native.hd_size
    assert torch.equal(served.crops, native.crops)
