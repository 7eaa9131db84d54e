"""The stop deadline: after SIGTERM the process is gone within ``SECONDS``, whatever is stuck.

A stop waits for its threads: the batch on the GPU, the writer's last group, the decode pool.
A thread caught in a system call that never returns (an ``open()`` of a named pipe before
``safe_files`` existed, a read from a hung network mount) cannot be interrupted from Python, and
the interpreter joins its pool threads on exit, so one such thread used to keep the daemon alive
until systemd's ``TimeoutStopSec`` ran out and SIGKILL came: a stop reported as failed, and
nothing said which thread it was. Once armed (by the first SIGTERM or SIGINT), a watcher thread
waits ``SECONDS`` and then logs the threads still alive and ends the process with ``os._exit``:
status 0 when the orderly stop had finished (the journal is closed; only a thread was left
hanging), ``EX_SOFTWARE`` when it had not (the journal recovers what was running at the next
start, as after a crash).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

from phicapd.log import get_logger

log = get_logger(__name__)

#: Below the unit's ``TimeoutStopSec=45s`` (systemd/phicapd.service), so that we exit, not
#: systemd's SIGKILL, with the scheduler's 30 s drain grace inside it.
SECONDS = 40.0
EX_SOFTWARE = 70


class StopDeadline:
    """``arm`` when a stop is asked for; ``stopped`` once the orderly stop is done."""

    def __init__(self, seconds: float | None = None) -> None:
        self._seconds = seconds
        self._armed = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        """Start the clock (once; from a signal handler, so nothing here may block)."""
        if not self._armed.acquire(blocking=False):
            return
        seconds = SECONDS if self._seconds is None else self._seconds
        self._thread = threading.Thread(target=self._expire, args=(seconds,), name="phicapd-stop-deadline", daemon=True)
        self._thread.start()

    def stopped(self) -> None:
        self._stopped.set()

    def _expire(self, seconds: float) -> None:
        # A daemon thread: it runs on through the interpreter's exit, where pool threads are joined.
        time.sleep(seconds)
        me = threading.current_thread()
        stuck = sorted(t.name for t in threading.enumerate() if t is not me and t.is_alive() and not t.daemon)
        done = self._stopped.is_set()
        log.error(
            "the stop took too long; exiting anyway",
            seconds=seconds,
            stopped=done,
            threads=stuck,
        )
        with contextlib.suppress(Exception):  # a stream the exit closed already
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
        os._exit(0 if done else EX_SOFTWARE)
