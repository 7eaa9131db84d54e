"""Which jobs the decode pool is reading right now, in a file that a crash of the process leaves behind.

A crafted image can make a C decoder (Pillow's) kill the daemon while its job is only claimed in
memory; without a trace of it, every restart would decode it again until systemd gives up. So
each decode in progress holds one 8-byte slot of ``journal.sqlite3-decoding`` with its job id,
written with ``pwrite`` and cleared when the decode is done; the journal's ``recover`` reads what
a crash left there and counts an attempt against those jobs.

Not a column of the journal: a write transaction there waits for the writer's commit and its
fsync, and two of them per image cost the pipeline a third of its throughput
(``bench/pipeline.py``). A ``pwrite`` is a few microseconds and, like the journal's ``running``
mark, survives a crash of the process (the kernel holds the page), though not a power cut.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

_SLOT = struct.Struct("<q")


class DecodeMarks:
    """The job ids being decoded, one slot each; thread-safe."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        """``fresh``: the journal beside it was just made, so what the file holds names jobs of
        another journal and is dropped."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()
        self._slots: dict[int, int] = {}  # job id -> slot
        self._free: list[int] = []
        self._end = 0  # slots handed out so far (this process's; a crash's are read by ``left``)
        if fresh:
            self.reset()

    def set(self, job_id: int, decoding: bool) -> None:
        with self._lock:
            if decoding:
                if job_id in self._slots:
                    return
                slot = self._free.pop() if self._free else self._end
                self._end = max(self._end, slot + 1)
                os.pwrite(self._fd, _SLOT.pack(job_id), slot * _SLOT.size)
                self._slots[job_id] = slot
            else:
                slot = self._slots.pop(job_id, -1)
                if slot < 0:
                    return
                os.pwrite(self._fd, bytes(_SLOT.size), slot * _SLOT.size)
                self._free.append(slot)

    def left(self) -> list[int]:
        """The job ids marked and not cleared: what was being decoded when the process died."""
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0)
        usable = len(data) - len(data) % _SLOT.size
        return sorted({i for (i,) in _SLOT.iter_unpack(data[:usable]) if i})

    def reset(self) -> None:
        """Forget every mark (once ``recover`` counted them), durably, so a power cut cannot
        count them a second time."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._slots.clear()
            self._free.clear()
            self._end = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
