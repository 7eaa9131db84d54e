"""Logging: structlog for our code, the same renderer for the standard library's loggers.

One JSON object per line when stderr is not a terminal or when journald captures it, a
readable console format on a terminal. watchdog, transformers, urllib3 and huggingface_hub log
through the standard library; ``ProcessorFormatter`` renders their records with the same
processors so every line has the same shape.

journald stores every line of a service's stderr at priority "info" unless the line starts with
an sd-daemon prefix (``<3>`` for an error, ``<4>`` for a warning, ...; ``SyslogLevelPrefix=yes``
is the default), so when the stream *is* the journal each line gets the prefix of its record's
level and ``journalctl -p warning`` works. "The stream is the journal" is what sd-daemon(3)
prescribes: ``$JOURNAL_STREAM`` ("DEVICE:INODE") names the stream systemd connected, and it
must match ``fstat()`` of our stream; an inherited ``$JOURNAL_STREAM`` with stderr redirected to
a file, a pipe or a terminal does not count.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

Format = Literal["auto", "json", "console"]

_NOISY = {"urllib3": logging.WARNING, "filelock": logging.WARNING, "PIL": logging.INFO}


def is_journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd named in ``$JOURNAL_STREAM``."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        expected = (int(device), int(inode))
        st = os.fstat(stream.fileno())
    except (AttributeError, ValueError, OSError):  # unset or malformed, or no descriptor (StringIO)
        return False
    return (st.st_dev, st.st_ino) == expected


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald stores for a ``logging`` level (debug 7 ... critical 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _JournalPriorityFormatter(logging.Formatter):
    """Put the sd-daemon ``<N>`` prefix in front of every line another formatter renders."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # One prefix per line: journald stores each line as its own entry (a console traceback).
        return "\n".join(prefix + line for line in self._inner.format(record).split("\n"))


def resolve_format(fmt: Format, stream: TextIO) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    if is_journal_stream(stream):
        return "json"
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure_logging(fmt: Format = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Set up structlog and the root logger; returns the renderer chosen ("json" or "console")."""
    stream = stream or sys.stderr
    chosen = resolve_format(fmt, stream)
    numeric = logging.getLevelNamesMapping()[level.upper()]

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: structlog.types.Processor
    if chosen == "json":
        # Tracebacks as data, without each frame's local variables: those would put captions,
        # image bytes and whole job groups into the journal.
        shared.append(structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[
            # Drop below-level events before any other processor spends time on them.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter: logging.Formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    if is_journal_stream(stream):
        formatter = _JournalPriorityFormatter(formatter)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_phicapd", False):
            root.removeHandler(old)
    handler._phicapd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, floor in _NOISY.items():
        logging.getLogger(name).setLevel(max(numeric, floor))
    return chosen


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def adopt_transformers_logging() -> None:
    """transformers installs its own stderr handler; route its records through ours instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
