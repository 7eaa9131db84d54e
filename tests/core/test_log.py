"""Logging: JSON lines off a terminal and under journald, the console renderer on a terminal,
and the standard library's loggers (watchdog, transformers, urllib3) rendered the same way."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from phicapd.log import configure_logging, get_logger


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


def test_journald_gets_json_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert configure_logging("auto", "info", FakeTty()) == "json"


def test_level_filters_and_reconfiguring_does_not_duplicate_lines() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    configure_logging("json", "warning", stream)
    structlog.get_logger("phicapd.test").info("hidden")
    structlog.get_logger("phicapd.test").warning("shown")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["shown"]
