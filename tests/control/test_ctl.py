"""phicapctl end to end against a live server with the fake backend."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phicapd.cli.ctl import build_parser, main, resolve_socket
from phicapd.cli.ctl_caption import Progress
from phicapd.config import ControlSettings
from phicapd.control.batch import Outcome
from phicapd.control.server import ControlServer
from tests.control.fakes import GOOD_MAGIC, FakeBackend

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

# The interpreter lives under /root (0700), so the child imports everything as root and only
# then drops to nobody: from there on it has exactly an unprivileged user's file access.
_AS_NOBODY = f"""
import os, sys
import phicapd.cli.ctl as ctl
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.exit(ctl.main(sys.argv[1:]))
"""


def ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), *args])


def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def image(path: Path, payload: bytes = b"pixels") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GOOD_MAGIC + payload)
    return path


@pytest.fixture
def sock(server: ControlServer, settings: ControlSettings) -> Path:
    return settings.socket


# -- another user's files: the bytes travel, the daemon never opens a path ----------------------


@pytest.fixture
def group_server(sock_dir: Path, backend: FakeBackend) -> Iterator[Path]:
    """A server whose socket nobody may use through the group, as with the systemd unit."""
    sock_dir.chmod(0o711)
    settings = ControlSettings(socket=sock_dir / "ctl.sock", socket_group="nogroup")
    with ControlServer(settings, backend):
        yield settings.socket


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_caption_file_readable_only_by_the_client(group_server: Path, sock_dir: Path, backend: FakeBackend) -> None:
    private = sock_dir / "private"
    photo = image(private / "photo.jpg", b"secret pixels")
    for p in (private, photo):
        os.chown(p, NOBODY, NOBODY)
    private.chmod(0o700)
    photo.chmod(0o600)

    done = run_as_nobody("--socket", str(group_server), "caption-file", str(photo))

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"caption of photo.jpg ({len(GOOD_MAGIC) + 13} bytes)\n"
    assert backend.received == [("photo.jpg", GOOD_MAGIC + b"secret pixels")]
    sidecar = private / "photo.txt"
    assert sidecar.read_text() == done.stdout
    assert sidecar.stat().st_uid == NOBODY  # written by the client, not by the daemon


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_directory_the_client_cannot_write(group_server: Path, sock_dir: Path, backend: FakeBackend) -> None:
    locked = sock_dir / "locked"  # root's, 0755: nobody can read it but not write to it
    locked_photo = image(locked / "a.jpg")
    locked.chmod(0o755)
    writable = sock_dir / "mine"
    ok_photo = image(writable / "b.jpg")
    for p in (writable, ok_photo):
        os.chown(p, NOBODY, NOBODY)

    done = run_as_nobody("--socket", str(group_server), "caption-file", str(locked_photo), str(ok_photo))

    assert done.returncode == 73, done.stderr
    assert f"{locked / 'a.txt'}: directory {locked} is not writable" in done.stderr
    assert not (locked / "a.txt").exists()
    assert (writable / "b.txt").read_text() == "caption of b.jpg (10 bytes)\n"  # the other file went on
    assert [name for name, _ in backend.received] == ["b.jpg"]  # no GPU time for an unsavable caption


def test_sidecar_write_failure_is_reported_and_others_continue(sock: Path, tmp_path: Path, capsys) -> None:
    bad = image(tmp_path / "bad" / "a.jpg")
    (tmp_path / "bad" / "a.txt").mkdir()  # the sidecar path is taken by a directory
    good = image(tmp_path / "good" / "b.jpg")

    assert ctl(sock, "caption-file", "--force", str(bad), str(good)) == 73

    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'bad' / 'a.txt'}: a directory, not a regular file" in err
    assert (tmp_path / "good" / "b.txt").exists()


# -- sidecar naming and the existing policy -----------------------------------------------------


def test_naming_matches_the_daemon(sock: Path, tmp_path: Path, capsys) -> None:
    jpg, png = image(tmp_path / "a.jpg"), image(tmp_path / "a.png")
    assert ctl(sock, "caption-file", str(png), str(jpg)) == 0
    assert (tmp_path / "a.txt").read_text() == "caption of a.jpg (10 bytes)\n"
    assert (tmp_path / "a.png.txt").read_text() == "caption of a.png (10 bytes)\n"
    out = capsys.readouterr().out
    assert f"{jpg}: caption of a.jpg (10 bytes)\n" in out


def test_up_to_date_sidecar_is_kept_unless_forced(sock: Path, tmp_path: Path, backend: FakeBackend, capsys) -> None:
    photo = image(tmp_path / "p.jpg")
    (tmp_path / "p.txt").write_text("hand-edited\n")
    assert ctl(sock, "caption-file", str(photo)) == 0
    assert backend.received == []
    assert (tmp_path / "p.txt").read_text() == "hand-edited\n"
    assert "skipped" in capsys.readouterr().err

    assert ctl(sock, "caption-file", "--force", str(photo)) == 0
    assert (tmp_path / "p.txt").read_text() == "caption of p.jpg (10 bytes)\n"


def test_older_sidecar_and_overwrite_policy(sock: Path, tmp_path: Path, backend: FakeBackend) -> None:
    photo = image(tmp_path / "p.jpg")
    sidecar = tmp_path / "p.txt"
    sidecar.write_text("old\n")
    os.utime(sidecar, (time.time() - 100, time.time() - 100))  # older than its image
    assert ctl(sock, "caption-file", str(photo)) == 0
    assert sidecar.read_text().startswith("caption of")

    sidecar.write_text("fresh but unwanted\n")
    backend.existing = "overwrite"
    assert ctl(sock, "caption-file", str(photo)) == 0
    assert sidecar.read_text().startswith("caption of")


def test_stdout_writes_no_sidecar(sock: Path, tmp_path: Path, capsys) -> None:
    photo = image(tmp_path / "p.jpg")
    assert ctl(sock, "caption-file", "--stdout", "--prompt", "brief", "--max-new-tokens", "9", str(photo)) == 0
    assert capsys.readouterr().out == "caption of p.jpg (10 bytes) for 'brief'\n"
    assert os.listdir(tmp_path) == ["p.jpg"]


def test_json_lines(sock: Path, tmp_path: Path, capsys) -> None:
    good, bad = image(tmp_path / "g.jpg"), tmp_path / "b.jpg"
    bad.write_bytes(b"BAD")
    assert ctl(sock, "caption-file", "--json", str(good), str(bad)) == 65
    rows = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["g.jpg"]["state"] == "captioned"
    assert rows["g.jpg"]["sidecar"] == str(tmp_path / "g.txt")
    assert rows["g.jpg"]["model"] == "fake@1"
    assert rows["b.jpg"]["state"] == "failed"
    assert rows["b.jpg"]["error"]["code"] == "image_unsupported"


# -- caption-dir --------------------------------------------------------------------------------


def test_caption_dir_is_concurrent_and_filters_names(sock: Path, tmp_path: Path, backend: FakeBackend) -> None:
    backend.delay = 0.25
    for i in range(8):
        image(tmp_path / f"img{i}.jpg")
    image(tmp_path / "sub" / "deep.png")
    image(tmp_path / ".hidden" / "x.jpg")
    image(tmp_path / ".dot.jpg")
    image(tmp_path / "partial.jpg.part")
    (tmp_path / "notes.md").write_text("not an image")

    started = time.monotonic()
    assert ctl(sock, "caption-dir", "--jobs", "8", str(tmp_path)) == 0
    assert time.monotonic() - started < 1.5  # 8 x 0.25 s one after the other would be 2 s
    assert sorted(n for n, _ in backend.received) == [f"img{i}.jpg" for i in range(8)]

    backend.received.clear()
    assert ctl(sock, "caption-dir", "--recursive", str(tmp_path)) == 0  # the 8 are up to date now
    assert [n for n, _ in backend.received] == ["deep.png"]
    assert (tmp_path / "sub" / "deep.txt").exists()


def test_caption_dir_of_a_missing_directory(sock: Path, tmp_path: Path, capsys) -> None:
    assert ctl(sock, "caption-dir", str(tmp_path / "nope")) == 66
    assert capsys.readouterr().err == f"phicapctl: {tmp_path / 'nope'}: no such directory\n"
    assert ctl(sock, "caption-dir", str(image(tmp_path / "a.jpg"))) == 66
    assert "a.jpg: not a directory" in capsys.readouterr().err


def test_an_empty_file_is_said_to_be_empty(sock: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert ctl(sock, "caption-file", str(empty)) == 65
    assert f"{empty}: the file is empty (0 bytes)" in capsys.readouterr().err
    assert not (tmp_path / "empty.txt").exists()


def test_results_come_in_argument_order(sock: Path, tmp_path: Path, backend: FakeBackend, capsys) -> None:
    a, b, c = (image(tmp_path / name) for name in ("a.jpg", "b.jpg", "c.jpg"))
    backend.waits_for = {"a.jpg": "b.jpg", "b.jpg": "c.jpg"}  # they finish c, b, a
    assert ctl(sock, "caption-file", "--stdout", "-j", "3", str(a), str(b), str(c)) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == [str(a), str(b), str(c)]


def test_the_file_is_named_once_in_an_error(sock: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"BAD")
    assert ctl(sock, "caption-file", str(bad)) == 65
    assert capsys.readouterr().err == f"phicapctl: {bad}: not an image\n"


# -- caption-url and the small commands ---------------------------------------------------------


def test_caption_url_output_and_json(sock: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cap.txt"
    assert ctl(sock, "caption-url", "--output", str(out), "https://example.com/a.jpg") == 0
    assert out.read_text() == "caption of https://example.com/a.jpg\n"
    assert capsys.readouterr().out == ""
    assert ctl(sock, "caption-url", "--json", "https://example.com/b.jpg") == 0
    assert json.loads(capsys.readouterr().out)["url"] == "https://example.com/b.jpg"


def test_caption_url_json_failure_prints_one_error_object(sock: Path, capsys) -> None:
    assert ctl(sock, "caption-url", "--json", "http://refused.example/x.jpg") == 65
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "url": "http://refused.example/x.jpg",
        "state": "failed",
        "error": {"code": "url_address_refused", "message": "http://refused.example/x.jpg: address not allowed"},
    }


def test_retry_of_a_path_that_is_not_failed(sock: Path, capsys) -> None:
    assert ctl(sock, "retry", "/srv/not-failed.jpg") == 65
    assert "/srv/not-failed.jpg: not a failed image" in capsys.readouterr().err
    assert ctl(sock, "retry", "/srv/a.jpg", "/srv/not-failed.jpg") == 65
    assert "1 of the 2 paths: not a failed image" in capsys.readouterr().err
    assert ctl(sock, "retry", "/srv/a.jpg") == 0


def test_status_health_and_friends(sock: Path, backend: FakeBackend, capsys) -> None:
    assert ctl(sock, "status") == 0
    out = capsys.readouterr().out
    assert "state" in out and "ready" in out and "background=3" in out
    assert ctl(sock, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["sidecar"] == {"extension": ".txt", "existing": "skip"}
    assert ctl(sock, "failures", "--limit", "1") == 0
    assert capsys.readouterr().out.count("image_truncated") == 1
    assert ctl(sock, "retry", "rel/x.jpg") == 0
    assert backend.retried == [[os.path.abspath("rel/x.jpg")]]
    assert ctl(sock, "pause") == 0 and backend.paused
    assert ctl(sock, "resume") == 0 and not backend.paused
    assert ctl(sock, "rescan") == 0 and backend.rescans == 1
    assert ctl(sock, "version") == 0
    assert "api v1" in capsys.readouterr().out
    assert ctl(sock, "health") == 0
    backend.ready.clear()
    assert ctl(sock, "health") == 69
    assert ctl(sock, "status") == 0


def test_health_is_0_only_when_a_caption_can_be_made_and_prints_the_state(
    sock: Path, backend: FakeBackend, capsys
) -> None:
    assert ctl(sock, "health") == 0
    assert capsys.readouterr().out == "ready\n"
    backend.waiting = "all endpoints are down: http://gpu1:8000/v1: connection refused"
    assert ctl(sock, "health") == 69
    out = capsys.readouterr().out
    assert out == "waiting: cannot caption now (all endpoints are down: http://gpu1:8000/v1: connection refused)\n"
    backend.waiting = None
    backend.ready.clear()
    assert ctl(sock, "health") == 69
    assert capsys.readouterr().out == "loading: cannot caption now (loading the model)\n"


# -- exit codes ---------------------------------------------------------------------------------


def test_exit_code_unreachable(sock_dir: Path, tmp_path: Path, capsys) -> None:
    missing = sock_dir / "none.sock"
    assert ctl(missing, "status") == 69
    assert ctl(missing, "caption-file", str(image(tmp_path / "a.jpg"))) == 69
    assert "no daemon socket" in capsys.readouterr().err


def test_exit_code_rejected_and_failed(sock: Path, tmp_path: Path) -> None:
    rejected = tmp_path / "r.jpg"
    rejected.write_bytes(b"BAD")
    failed = tmp_path / "f.jpg"
    failed.write_bytes(b"FAIL")
    assert ctl(sock, "caption-file", str(rejected)) == 65
    assert ctl(sock, "caption-file", str(failed)) == 70
    assert ctl(sock, "caption-file", str(rejected), str(failed)) == 70  # the worse one wins
    assert ctl(sock, "caption-url", "http://refused.example/x.jpg") == 65
    assert ctl(sock, "caption-file", str(tmp_path / "missing.jpg")) == 66


def test_exit_code_usage(capsys) -> None:
    assert main(["caption-file"]) == 64
    assert main(["frobnicate"]) == 64
    assert main(["caption-file", "--max-new-tokens", "0", "x.jpg"]) == 64


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_timeout_must_be_some_seconds(value: str, capsys) -> None:
    assert main(["--timeout", value, "status"]) == 64
    assert "argument --timeout: expected a number of seconds" in capsys.readouterr().err
    assert main(["caption-url", "--caption-timeout", value, "http://x/"]) == 64


def test_a_bad_count_names_the_type(capsys) -> None:
    assert main(["failures", "--limit", "abc"]) == 64
    err = capsys.readouterr().err
    assert "expected a positive integer, got 'abc'" in err and "_positive" not in err


def _options_of(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", a) for o, a in _options_of(sub))
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield "/".join(action.option_strings) or action.dest, action


def test_every_command_and_option_is_described(capsys) -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description, name
    for name, action in _options_of(parser):
        assert action.help, f"{name} has no help"
    assert main(["caption-file", "--help"]) == 0
    out = capsys.readouterr().out
    assert "-j JOBS, --jobs JOBS  requests in flight (default: 16)" in out
    assert "(default: 900.0)" in out
    assert "141" not in out and "`phicapctl --help` lists the others" in out  # the table is printed once
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in (0, 64, 65, 66, 69, 70, 73, 141):
        assert f"\n  {code} " in out


def test_caption_url_help_speaks_of_urls_not_files(capsys) -> None:
    assert main(["caption-url", "--help"]) == 0
    out = capsys.readouterr().out
    assert "watch root" not in out and "(default: the daemon's prompt)" in " ".join(out.split())
    assert main(["caption-file", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: the prompt of the file's watch root, else the daemon's)" in out


# The reader of stdout is gone before phicapctl writes a byte: its write fails with EPIPE.
_CLOSED_STDOUT = """
import os, sys
import phicapd.cli.ctl as ctl
read, write = os.pipe()
os.close(read)
os.dup2(write, 1)
sys.exit(ctl.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["status"], ["failures"], ["metrics"], ["status", "--json"]])
def test_a_closed_stdout_ends_quietly(sock: Path, command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CLOSED_STDOUT, "--socket", str(sock), *command],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (141, "")


def test_socket_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PHICAPD_SOCKET", str(tmp_path / "env.sock"))
    assert resolve_socket(None) == tmp_path / "env.sock"
    assert resolve_socket(str(tmp_path / "flag.sock")) == tmp_path / "flag.sock"
    monkeypatch.delenv("PHICAPD_SOCKET")
    monkeypatch.setattr("phicapd.cli.ctl.SYSTEM_SOCKET_PATH", tmp_path / "missing" / "phicapd.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resolve_socket(None) == tmp_path / "phicapd.sock"
    # The system directory exists (the socket unit made it): use it even when this user cannot
    # see the socket inside, so the error is "permission denied", not "no daemon".
    (tmp_path / "run").mkdir()
    monkeypatch.setattr("phicapd.cli.ctl.SYSTEM_SOCKET_PATH", tmp_path / "run" / "phicapd.sock")
    assert resolve_socket(None) == tmp_path / "run" / "phicapd.sock"


@pytest.fixture
def no_socket_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in the environment or on this machine says where the daemon is."""
    monkeypatch.delenv("PHICAPD_SOCKET", raising=False)
    monkeypatch.delenv("PHICAPD_CONFIG", raising=False)
    monkeypatch.setattr("phicapd.cli.ctl.DEFAULT_CONFIG_PATH", tmp_path / "etc" / "phicapd.toml")
    monkeypatch.setattr("phicapd.cli.ctl.SYSTEM_SOCKET_PATH", tmp_path / "no-run" / "phicapd.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-xdg"))


def _daemon_config(path: Path, socket: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[model]\ndevice = "cpu"\n[control]\nsocket = "{socket}"\nmax_connections = 8\n')
    return path


@pytest.mark.usefixtures("no_socket_env")
def test_config_names_the_socket(sock: Path, tmp_path: Path, capsys) -> None:
    assert main(["status"]) == 69  # today's defaults find no daemon
    capsys.readouterr()
    cfg = _daemon_config(tmp_path / "phicapd.toml", sock)
    assert main(["--config", str(cfg), "status"]) == 0
    assert "ready" in capsys.readouterr().out


@pytest.mark.usefixtures("no_socket_env")
def test_phicapd_config_and_the_system_config_name_the_socket(
    sock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHICAPD_CONFIG", str(_daemon_config(tmp_path / "env.toml", sock)))
    assert resolve_socket(None) == sock
    assert resolve_socket(None, tmp_path / "env.toml") == sock
    monkeypatch.setenv("PHICAPD_SOCKET", str(tmp_path / "env.sock"))  # the socket itself wins
    assert resolve_socket(None) == tmp_path / "env.sock"
    monkeypatch.delenv("PHICAPD_SOCKET")
    monkeypatch.delenv("PHICAPD_CONFIG")
    assert resolve_socket(None) == tmp_path / "no-xdg" / "phicapd.sock"  # today's default
    _daemon_config(tmp_path / "etc" / "phicapd.toml", sock)
    assert resolve_socket(None) == sock
    # A system config without [control] socket: the daemon's default, so today's rules.
    (tmp_path / "etc" / "phicapd.toml").write_text('[model]\ndevice = "cpu"\n')
    assert resolve_socket(None) == tmp_path / "no-xdg" / "phicapd.sock"


@pytest.mark.usefixtures("no_socket_env")
def test_a_config_that_cannot_be_read_is_named(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "status"]) == 66
    assert capsys.readouterr().err == f"phicapctl: config file {tmp_path / 'nope.toml'} does not exist\n"
    bad = tmp_path / "bad.toml"
    bad.write_text("[control]\nsocket = 3\n")
    assert main(["--config", str(bad), "status"]) == 66
    assert f"{bad}:\n  control.socket: Input is not a valid path" in capsys.readouterr().err


def test_progress_line_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    outcomes = [Outcome(Path("a.jpg"), None, "captioned"), Outcome(Path("b.jpg"), None, "skipped")]
    for stream in (tty, pipe):
        progress = Progress(2, stream)
        for o in outcomes:
            progress.update(o)
        progress.finish()
    assert tty.getvalue().endswith("2/2 done, 1 skipped, 0 failed\n")
    assert pipe.getvalue() == ""


def test_status_for_humans_splits_sections_rounds_and_shows_times(
    sock: Path, backend: FakeBackend, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    status = backend.status

    def detailed() -> dict[str, object]:
        out = status()
        out["model"] = {"id": "fake", "engine": {"decode": "cuda-graphs", "prefill_s": 0.116149397}}
        out["recent_failures"] = [{"path": "/srv/a.jpg", "code": "image_truncated", "at": 1795949425.96}]
        return out

    monkeypatch.setattr(backend, "status", detailed)
    try:
        assert ctl(sock, "status") == 0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    lines = capsys.readouterr().out.splitlines()
    model = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[model].split() == ["model", "id=fake"]
    assert lines[model + 1].split() == ["engine", "decode=cuda-graphs", "prefill_s=0.116"]
    assert any("at=2026-11-29 10:50:25" in line for line in lines)


def test_status_lists_remote_endpoints_one_per_line(
    sock: Path, backend: FakeBackend, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = backend.status
    endpoints = [
        {"url": "http://gpu1:8000/v1", "up": True, "in_flight": 7, "limit": 8, "latency_ms": 812.5, "errors": 0},
        {"url": "http://gpu2:8000/v1", "up": False, "reason": "cannot connect: Connection refused", "errors": 3},
    ]
    model = {"backend": "openai", "identity": "openai:phi", "endpoints": endpoints}
    monkeypatch.setattr(backend, "status", lambda: {**status(), "model": model})
    assert ctl(sock, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[at].split() == ["model", "backend=openai", "identity=openai:phi"]
    assert lines[at + 1].split() == ["endpoints", "2", "entries"]
    assert "url=http://gpu1:8000/v1  up=True  in_flight=7  limit=8  latency_ms=812" in lines[at + 2]
    assert "up=False  reason=cannot connect: Connection refused  errors=3" in lines[at + 3]


def test_status_says_when_it_waits_for_a_remote_endpoint(
    sock: Path, backend: FakeBackend, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = backend.status
    waiting = "all endpoints are down: http://gpu1:8000/v1: cannot connect: Connection refused"
    progress = {"backlog": 40, "images_per_second": 0.0, "rate_window_seconds": 60.0, "eta_seconds": None}
    monkeypatch.setattr(
        backend,
        "status",
        lambda: {
            **status(),
            "state": "waiting",
            "progress": progress,
            "model": {"backend": "openai", "waiting": waiting},
        },
    )
    assert ctl(sock, "status") == 0
    out = capsys.readouterr().out
    assert "no estimate while every remote endpoint is down" in out and waiting in out
    assert ctl(sock, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "waiting"
    monkeypatch.setattr(backend, "status", lambda: {**status(), "state": "paused", "progress": progress})
    assert ctl(sock, "status") == 0
    assert "; paused, so no estimate" in capsys.readouterr().out  # read before the state line took it out


@pytest.mark.parametrize(
    ("progress", "left"),
    [
        (
            {"backlog": 1234, "images_per_second": 1.71, "rate_window_seconds": 300.0, "eta_seconds": 721.6},
            "1,234 images, done in about 12 min at 1.71 images/s while busy",
        ),
        (
            {"backlog": 50, "images_per_second": 0.0, "rate_window_seconds": 45.0, "eta_seconds": None},
            "50 images; no estimate yet (nothing captioned in the last 5 min)",
        ),
        (
            {"backlog": 100_000, "images_per_second": 0.5, "rate_window_seconds": 300.0, "eta_seconds": 200_000.0},
            "100,000 images, done in about 2.3 days at 0.5 images/s while busy",
        ),
        ({"backlog": 0, "images_per_second": 2.0, "rate_window_seconds": 300.0, "eta_seconds": 0.0}, "nothing queued"),
        (
            {"backlog": 1, "runnable": 1, "retrying": 0, "images_per_second": 2.0, "eta_seconds": 0.5},
            "1 image, done in about 0 s at 2 images/s while busy",
        ),
        (
            {"backlog": 1, "runnable": 0, "retrying": 1, "next_retry_in_seconds": 52.0, "images_per_second": 2.0}
            | {"eta_seconds": None, "no_eta": "retrying"},
            "1 image waiting to be retried, the first in 52 s",
        ),
        (
            {"backlog": 12, "runnable": 10, "retrying": 2, "next_retry_in_seconds": 30.0, "images_per_second": 2.0}
            | {"eta_seconds": 5.0, "no_eta": None},
            "10 images, done in about 5 s at 2 images/s while busy; 2 images waiting to be retried, the first in 30 s",
        ),
        (
            {"backlog": 54, "runnable": 54, "images_per_second": 2.0, "eta_seconds": None, "no_eta": "paused"},
            "54 images; paused, so no estimate (`phicapctl resume` goes on)",
        ),
        (
            {"backlog": 54, "runnable": 54, "images_per_second": 2.0, "eta_seconds": None, "no_eta": "waiting"},
            "54 images; no estimate while every remote endpoint is down (model.waiting says why)",
        ),
    ],
)
def test_status_says_what_is_left_and_when_before_the_counters(
    sock: Path, backend: FakeBackend, capsys, monkeypatch: pytest.MonkeyPatch, progress: dict, left: str
) -> None:
    status = backend.status
    failures = {"caption_empty": 3, "image_truncated": 1} if progress["backlog"] else {}
    monkeypatch.setattr(backend, "status", lambda: {**status(), "progress": {**progress, "failures_by_code": failures}})
    assert ctl(sock, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["state", "ready"]
    assert lines[1].split(None, 1) == ["left", left]
    assert (
        lines[2].split() == ["failures", "caption_empty=3", "image_truncated=1"] if failures else ["failures", "none"]
    )
    assert any(line.startswith("journal ") for line in lines[3:])  # the raw counters follow
    assert not any(line.startswith("progress") for line in lines)  # shown above, not twice
