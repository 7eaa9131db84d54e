"""The parent's side of the exiv2 worker (``exiv2_worker``): one long-lived child, started on
first use, asked one request at a time, replaced when it dies or hangs. The decode workers
(``decode_pool``) are each one of these too.

One worker behind a lock rather than a pool: a request costs well under a millisecond of round
trip on top of exiv2's own work (docs/outputs.md, "Output formats"), the daemon's exiv2 calls are a few
per image against seconds of model time, and one child keeps the memory and the
kill-and-restart logic simple. The price: while a hostile file hangs the worker, other calls
wait for its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The directory that holds the ``phicapd`` package: the worker imports this very copy, even where
#: the daemon runs from a source tree that is not on the default path.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class WorkerDied(Exception):
    """The worker crashed, exited or hung (and was killed) on a request; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    """Runs requests in a worker started from ``command``; a new command means a new worker."""

    def __init__(self, *, pass_fds: Sequence[int] = ()) -> None:
        """``pass_fds``: descriptors every worker inherits (a shared buffer)."""
        self._pass_fds = tuple(pass_fds)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._command: tuple[str, ...] = ()
        self._buffer = b""
        self.started = 0  # workers started so far, and
        self.died = 0  # calls a worker died on (the tests count both)

    def call(self, command: Sequence[str], request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The worker's answer to ``request``; ``WorkerDied`` if it died or took over ``timeout`` s
        (the next call then gets a fresh worker). Waiting for the lock is not part of the timeout."""
        with self._lock:
            try:
                return self._call(tuple(command), request, timeout)
            except WorkerDied:
                self.died += 1
                raise

    def _call(self, command: tuple[str, ...], request: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self._ensure(command)
        line = json.dumps(request).encode() + b"\n"
        try:
            assert proc.stdin is not None
            view = memoryview(line)
            while view:
                view = view[os.write(proc.stdin.fileno(), view) :]
        except OSError:  # died since the last call (BrokenPipeError)
            raise WorkerDied(self._reap()) from None
        return self._answer(proc, timeout)

    def start(self, command: Sequence[str]) -> None:
        """Start the worker now rather than at the first call (which then finds it imported)."""
        with self._lock:
            self._ensure(tuple(command))

    def close(self) -> None:
        """Let the worker go: stdin closes, so it exits; killed if it does not at once."""
        with self._lock:
            self._stop()

    def _ensure(self, command: tuple[str, ...]) -> subprocess.Popen[bytes]:
        if self._proc is not None and (self._proc.poll() is not None or command != self._command):
            self._stop()
        if self._proc is None:
            # A session of its own: a Ctrl-C in the daemon's terminal is the daemon's to handle,
            # not a crash of the worker. It exits when its stdin closes, i.e. with the daemon.
            path = os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,
                pass_fds=self._pass_fds,
                env={**os.environ, "PYTHONPATH": path},
            )
            self._command = command
            self._buffer = b""
            self.started += 1
        return self._proc

    def _answer(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select(): the daemon may hold more than 1024 descriptors
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise WorkerDied(f"gave no answer within {timeout:g} s and was killed")
            if not poller.poll(max(1, round(remaining * 1000))):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerDied(self._reap())
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self._kill()
            raise WorkerDied(f"answered something that is not the protocol ({line[:80]!r}) and was killed")
        return answer

    def _reap(self) -> str:
        """The worker closed its end: wait for it to be gone; why it ended."""
        assert self._proc is not None
        try:
            returncode = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._kill()
            return "closed its output and was killed"
        self._stop()
        return _describe_exit(returncode)

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
