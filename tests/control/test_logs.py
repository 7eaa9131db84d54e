"""The control tests' logging override works whatever an earlier test configured."""

from __future__ import annotations

import io
import json

import structlog

from phicapd.log import configure_logging
from tests.control.logs import logs_to


def test_override_after_the_daemons_logging_configuration() -> None:
    daemon_stream = io.StringIO()
    configure_logging("json", "info", daemon_stream)  # what a daemon test leaves behind
    try:
        ours = io.StringIO()
        with logs_to(ours):
            structlog.get_logger("phicapd.control.server").info("request", status=200)
        assert "request" in ours.getvalue() and "status=200" in ours.getvalue()

        # Afterwards the daemon's configuration is back in force.
        structlog.get_logger("phicapd.test").warning("after")
        assert json.loads(daemon_stream.getvalue().splitlines()[-1])["event"] == "after"
    finally:
        configure_logging("json", "warning")
