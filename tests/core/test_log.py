"""Logging: JSON lines off a terminal and under journald, the console renderer on a terminal,
and the standard library's loggers (watchdog, transformers, urllib3) rendered the same way."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import IO

import pytest
import structlog

from phicapd.log import configure_logging, get_logger, is_journal_stream, resolve_format, syslog_priority


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> None:
    yield
    configure_logging("json", "warning")


def test_json_lines_parse_for_ours_and_stdlib_loggers() -> None:
    stream = io.StringIO()
    assert configure_logging("auto", "info", stream) == "json"
    get_logger("phicapd.test").info("job", path="/x/a.jpg", outcome="done", batch=4)
    logging.getLogger("watchdog.observers.inotify_c").warning("queue overflow")
    logging.getLogger("urllib3").info("noise below its floor")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0]["event"] == "job" and records[0]["outcome"] == "done" and records[0]["batch"] == 4
    assert records[0]["level"] == "info" and "timestamp" in records[0]
    assert records[1] == {**records[1], "event": "queue overflow", "logger": "watchdog.observers.inotify_c"}
    assert len(records) == 2


def test_a_terminal_gets_the_console_renderer() -> None:
    stream = FakeTty()
    assert configure_logging("auto", "info", stream) == "console"
    get_logger("phicapd.test").info("ready", model="m")
    line = stream.getvalue()
    assert "ready" in line and "model" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_journald_gets_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w") as stream:
        _journal_env(monkeypatch, stream)
        assert configure_logging("auto", "info", stream) == "json"
    # A JOURNAL_STREAM naming some other stream is not the journal: a terminal stays a terminal.
    assert configure_logging("auto", "info", FakeTty()) == "console"


def test_level_filters_and_reconfiguring_does_not_duplicate_lines() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    configure_logging("json", "warning", stream)
    structlog.get_logger("phicapd.test").info("hidden")
    structlog.get_logger("phicapd.test").warning("shown")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["shown"]


def _journal_env(monkeypatch: pytest.MonkeyPatch, stream: IO[str]) -> None:
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_lines_to_the_journal_carry_the_syslog_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        _journal_env(monkeypatch, stream)
        assert configure_logging("auto", "debug", stream) == "json"
        log = get_logger("phicapd.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("x")
        logging.getLogger("watchdog").warning("stdlib w")
        logging.getLogger("transformers").error("stdlib e")
        stream.seek(0)
        lines = stream.read().splitlines()
    prefixes = [line[: line.index("{")] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>", "<4>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == ["d", "i", "w", "e", "c", "x", "stdlib w", "stdlib e"]
    assert "boom" in json.dumps(events[5]["exception"])  # the traceback stays inside the one line


def test_console_format_to_the_journal_prefixes_every_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        _journal_env(monkeypatch, stream)
        configure_logging("console", "info", stream)
        try:
            raise ValueError("boom")
        except ValueError:
            get_logger("phicapd.test").exception("failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)


@pytest.mark.parametrize("journal", ["", "nonsense", "1:2"])
def test_json_to_a_file_or_pipe_has_no_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: str) -> None:
    # systemd exports JOURNAL_STREAM to children too: `phicapd run 2>file` from a service's
    # shell, or a pipe, must get plain JSON lines.
    monkeypatch.setenv("JOURNAL_STREAM", journal)
    with (tmp_path / "log").open("w+") as stream:
        assert configure_logging("json", "info", stream) == "json"
        get_logger("phicapd.test").warning("w")
        logging.getLogger("watchdog").error("e")
        stream.seek(0)
        records = [json.loads(line) for line in stream.read().splitlines()]
    assert [r["event"] for r in records] == ["w", "e"]


def test_a_terminal_with_an_inherited_journal_stream_gets_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty, os.fdopen(leader, "rb", buffering=0):
        # Another stream's JOURNAL_STREAM (a terminal started from a systemd unit inherits it).
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert resolve_format("auto", tty) == "console"
        assert not is_journal_stream(tty)
        _journal_env(monkeypatch, tty)  # the terminal *is* the journal stream: unusual, but JSON
        assert resolve_format("auto", tty) == "json"
        assert is_journal_stream(tty)


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2), (25, 6)],
)
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority
