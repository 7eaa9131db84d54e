"""The whole daemon on the remote backend: watched files -> loopback vLLM-like servers -> sidecars.

The must-shows: with two servers and 500 images, killing one mid-run loses nothing and captions
each image exactly once; with every server down for a while (``PHICAPD_OUTAGE_SECONDS``, 3 s
here, 30 s when run by hand) and then back, every image is captioned and none is parked.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phicapd.errors import PhicapError
from phicapd.service import Daemon, load_model_captioner
from tests.support.daemon import REPO, is_settled, running_daemon, settings_for, wait_for, write_config
from tests.support.fakes import unique_image, write_unique_png
from tests.support.openai_server import MODEL, FakeVLLM, spawn


def _remote(*urls: str, extra: str = "", limit: int = 8) -> str:
    endpoints = ", ".join(f'"{u}"' for u in urls)
    return (
        '[model]\nbackend = "openai"\n'
        f"[remote]\nendpoints = [{endpoints}]\n"
        f'image_format = "png"\nprobe_interval_seconds = 0.2\ninitial_in_flight = 4\nmax_in_flight = {limit}\n' + extra
    )


def _sidecars(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in root.glob("*.txt")}


def _journal(daemon: Daemon) -> list[sqlite3.Row]:
    db = sqlite3.connect(daemon.store.path)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM jobs ORDER BY path").fetchall()
    finally:
        db.close()


def _drop(root: Path, n: int) -> dict[str, str]:
    """n unique images; name -> the caption the fake servers give it."""
    expected = {}
    for i in range(n):
        key = write_unique_png(root / f"img{i:04d}.png", i)
        expected[f"img{i:04d}.txt"] = f"A 8x8 test image {key}.\n"
    return expected


def test_the_daemon_captions_through_remote_endpoints_and_records_who_made_each(
    tmp_path: Path, servers: list[FakeVLLM]
) -> None:
    servers += [FakeVLLM(latency=0.02).start(), FakeVLLM(latency=0.02).start()]
    a, b = servers
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(a.url, b.url))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        expected = _drop(root, 40)
        wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == 40, 30, "40 sidecars")
        png = io.BytesIO()
        unique_image(999, (20, 10)).save(png, format="PNG")
        reply = daemon.api.caption_bytes(
            png.getvalue(), name="socket.png", prompt=None, max_new_tokens=None, timeout=10
        )
        status = daemon.api.status()
        metrics = daemon.api.metrics()
        failures = daemon.store.failures(100)
    assert _sidecars(root) == expected
    assert reply.text.startswith("A 20x10 test image") and reply.model == f"openai:{MODEL}"
    rows = _journal(daemon)
    assert {(r["state"], r["backend"], r["model"]) for r in rows} == {("done", "openai", MODEL)}
    assert {r["endpoint"] for r in rows} == {a.url, b.url}  # both did their share
    assert status["model"]["backend"] == "openai"
    endpoints = status["model"]["endpoints"]
    assert [e["url"] for e in endpoints] == [a.url, b.url]
    assert all(e["up"] and e["requests"] > 0 and e["latency_ms"] > 0 for e in endpoints)
    # The stand-ins refuse num_crops per request, as vLLM does by default: left out, nothing else failed.
    assert all(e["omits"] == ["mm_processor_kwargs"] for e in endpoints)
    assert all(e["errors"] == e["errors_by_kind"]["unsupported"] for e in endpoints)
    assert failures == []
    by_source = {s["endpoint"]: s["captions"] for s in status["captions_by_source"]}
    assert set(by_source) == {a.url, b.url} and sum(by_source.values()) == 40
    assert f'phicapd_endpoint_up{{endpoint="{a.url}"}} 1.0' in metrics
    assert f'phicapd_endpoint_limit{{endpoint="{b.url}"}}' in metrics
    assert "phicapd_endpoint_requests_total" in metrics


def test_killing_one_of_two_servers_mid_run_loses_nothing_and_captions_each_image_once(tmp_path: Path) -> None:
    first, url_a = spawn("--port", "0", "--latency", "0.05")
    second, url_b = spawn("--port", "0", "--latency", "0.05")
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(url_a, url_b))
    try:
        with running_daemon(settings, factory=load_model_captioner) as daemon:
            expected = _drop(root, 500)
            wait_for(lambda: len(_sidecars(root)) >= 100, 60, "100 sidecars")
            first.kill()  # kill -9, with requests in flight
            killed_at, killed_time = len(_sidecars(root)), time.time()
            wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == 500, 120, "500 sidecars", 0.2)
            status = daemon.api.status()
            captions = daemon.scheduler.throughput.total if daemon.scheduler else 0
    finally:
        first.kill()
        second.kill()
        first.wait()
        second.wait()
    assert killed_at < 500  # the kill was mid-run
    assert _sidecars(root) == expected  # every image, its own caption
    assert captions == 500  # each captioned once: no caption recorded twice
    rows = _journal(daemon)
    assert len(rows) == 500 and all(r["state"] == "done" and r["attempts"] == 0 for r in rows)
    down = status["model"]["endpoints"][0]
    assert down["up"] is False and down["errors"] >= 1
    after = [r["endpoint"] for r in rows if r["updated_at"] > killed_time + 1.0]
    assert after and set(after) == {url_b}  # after the kill only the survivor answered


def test_all_servers_down_then_back_every_image_captioned_none_parked(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    outage = float(os.environ.get("PHICAPD_OUTAGE_SECONDS", "3"))
    servers += [FakeVLLM(latency=0.05).start(), FakeVLLM(latency=0.05).start()]
    ports = [s.port for s in servers]
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(*(s.url for s in servers)))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        expected = _drop(root, 300)
        wait_for(lambda: len(_sidecars(root)) >= 30, 60, "30 sidecars")
        for s in servers:
            s.stop()
        servers.clear()
        wait_for(lambda: daemon.api.status()["state"] == "waiting", 10, "the daemon to say it waits")
        down_at = len(_sidecars(root))
        png = io.BytesIO()
        unique_image(999, (20, 10)).save(png, format="PNG")
        with pytest.raises(PhicapError) as info:  # a socket request is told at once
            daemon.api.caption_bytes(png.getvalue(), name="socket.png", prompt=None, max_new_tokens=None, timeout=10)
        assert info.value.code == "remote_unavailable" and info.value.retryable
        assert "all endpoints are down" in str(info.value)
        started = time.monotonic()
        while time.monotonic() - started < outage:
            status = daemon.api.status()
            assert status["state"] == "waiting" and "all endpoints are down" in status["model"]["waiting"]
            assert status["journal"]["failed"] == 0 and not status["progress"]["failures_by_code"]
            assert daemon.status_line().startswith("waiting: every remote endpoint is down")  # systemd's STATUS=
            time.sleep(0.5)
        servers += [FakeVLLM(port=p, latency=0.05).start() for p in ports]
        wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == 300, 120, "300 sidecars", 0.2)
        status = daemon.api.status()
    print(f"\noutage of {outage:.0f} s with {down_at} of 300 captioned: all 300 captioned after it, none parked")
    assert down_at < 300
    assert _sidecars(root) == expected
    assert status["state"] == "ready" and status["journal"]["failed"] == 0
    assert all(r["state"] == "done" and r["error_code"] is None for r in _journal(daemon))


def test_health_fails_while_every_endpoint_is_down(
    tmp_path: Path, servers: list[FakeVLLM], capsys: pytest.CaptureFixture[str]
) -> None:
    from phicapd.cli.ctl import main as ctl

    servers.append(FakeVLLM(latency=0.01).start())
    port = servers[0].port
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(servers[0].url))
    socket = str(settings.control.socket)
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        assert ctl(["--socket", socket, "health"]) == 0
        assert capsys.readouterr().out == "ready\n"
        servers.pop().stop()
        _drop(root, 3)  # work that meets the dead server
        wait_for(lambda: daemon.api.status()["state"] == "waiting", 10, "the daemon to say it waits")
        assert ctl(["--socket", socket, "health"]) == 69
        out = capsys.readouterr().out
        assert out.startswith("waiting: cannot caption now (all endpoints are down: http://127.0.0.1:"), out
        servers.append(FakeVLLM(port=port, latency=0.01).start())
        wait_for(lambda: daemon.api.status()["state"] == "ready", 10, "the endpoint to be back")
        assert ctl(["--socket", socket, "health"]) == 0


_NO_TORCH = """
import json, os, signal, sys, threading
from phicapd.cli.daemon import main
from tests.support.daemon import socket_ready, wait_for

def check():
    wait_for(lambda: socket_ready(sys.argv[2]), 30, "ready")
    wait_for(lambda: os.path.exists(sys.argv[3]), 30, "a sidecar")
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=check, daemon=True).start()
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_a_remote_daemon_never_imports_torch_or_transformers(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    servers.append(FakeVLLM().start())
    root = tmp_path / "inbox"
    root.mkdir()
    write_unique_png(root / "one.png", 1)
    settings = settings_for(tmp_path, [root], extra=_remote(servers[0].url))
    config = tmp_path / "phicapd.toml"  # what settings_for wrote
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(config), str(settings.control.socket), str(root / "one.txt")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert json.loads(result.stdout.decode().strip().splitlines()[-1]) == []
    assert (root / "one.txt").read_text().startswith("A 8x8 test image")


def test_a_wrong_key_stops_the_daemon_with_a_config_error(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    servers.append(FakeVLLM(api_key="right").start())
    key = tmp_path / "key"
    key.write_text("sk-wrong-1234\n")
    config = write_config(tmp_path, [], extra=_remote(servers[0].url, extra=f'api_key_file = "{key}"\n'))
    result = subprocess.run(
        [sys.executable, "-m", "phicapd", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 78
    err = result.stderr.decode()
    assert "the API key was refused" in err and "check api_key_file" in err
    assert "sk-wrong-1234" not in err


def test_a_stop_while_every_server_is_down_is_prompt_and_hands_the_jobs_back(
    tmp_path: Path, servers: list[FakeVLLM]
) -> None:
    servers.append(FakeVLLM(latency=0.05).start())
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(servers[0].url))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        _drop(root, 60)
        wait_for(lambda: len(_sidecars(root)) >= 5, 30, "5 sidecars")
        servers.pop().stop()
        wait_for(lambda: daemon.api.status()["state"] == "waiting", 10, "the daemon to say it waits")
        stopping = time.monotonic()
    stopped_in = time.monotonic() - stopping
    rows = _journal(daemon)
    assert stopped_in < 5  # not the 30 s drain grace
    assert {r["state"] for r in rows} <= {"done", "pending"}  # nothing left running, nothing failed
    assert sum(r["state"] == "pending" for r in rows) == 60 - len(_sidecars(root)) > 0
    assert all(r["attempts"] == 0 for r in rows)


def test_a_socket_request_goes_ahead_of_the_backlog(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    servers.append(FakeVLLM(latency=0.2).start())
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(servers[0].url, limit=4))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        _drop(root, 120)  # 3 rows for the backlog at 0.2 s each: about 8 s of work
        wait_for(lambda: len(_sidecars(root)) >= 6, 30, "the backlog to be under way")
        png = io.BytesIO()
        unique_image(999, (20, 10)).save(png, format="PNG")
        started = time.monotonic()
        reply = daemon.api.caption_bytes(
            png.getvalue(), name="socket.png", prompt=None, max_new_tokens=None, timeout=10
        )
        waited = time.monotonic() - started
        backlog = daemon.api.status()["progress"]["backlog"]
    assert reply.text.startswith("A 20x10 test image")
    assert backlog > 30  # the backlog was still there
    assert waited < 0.2 + 0.5  # its own request, not the backlog's 3 s+


def test_the_native_backend_records_itself_too(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    root.mkdir()
    with running_daemon(settings_for(tmp_path, [root])) as daemon:  # the fake stands for the native model
        _drop(root, 3)
        wait_for(lambda: is_settled(daemon) and len(_sidecars(root)) == 3, 30, "3 sidecars")
        status = daemon.api.status()
    assert {(r["backend"], r["endpoint"], r["model"]) for r in _journal(daemon)} == {("native", None, "fake@test")}
    assert status["captions_by_source"] == [
        {"backend": "native", "endpoint": None, "model": "fake@test", "captions": 3}
    ]
