"""structlog for the control tests: the server's request logs go to stderr, never to stdout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import structlog


@contextmanager
def logs_to(stream: TextIO) -> Iterator[None]:
    """Print structlog events to ``stream`` for the duration; restore the previous configuration.

    A whole configuration, not only a logger factory on top of whatever is configured: an earlier
    test may have run ``phicapd.log.configure_logging`` (the daemon tests do), whose processors
    (``filter_by_level``, ``add_logger_name``, ``wrap_for_formatter``) and wrapper class only work
    with standard-library loggers and fail on a ``PrintLogger``.
    """
    saved = structlog.get_config()
    structlog.reset_defaults()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(stream))
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
