"""Which jobs the decode pool is reading right now, in a file that a crash of the process leaves behind.

A crafted image can make a C decoder (Pillow's) kill the daemon while its job is only claimed in
memory; without a trace of it, every restart would decode it again until systemd gives up. So
each decode in progress holds one 8-byte slot of ``journal.sqlite3-decoding`` with its job id,
set in a shared mapping of the file and cleared when the decode is done; the journal's ``recover`` reads what
a crash left there and counts an attempt against those jobs.

Not a column of the journal: a write transaction there waits for the writer's commit and its
fsync, and two of them per image cost the pipeline a third of its throughput
(``bench/pipeline.py``). A store into a shared mapping costs nothing and, like the journal's
``running`` mark, survives a crash of the process (the kernel holds the page), though not a
power cut.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

_SLOT = struct.Struct("<q")


class DecodeMarks:
    """The job ids being decoded, one slot each; thread-safe.

    The file is mapped shared: a mark is a store into the page cache, with no system call to
    give up the GIL for (a ``pwrite`` from a busy decode pool waited 0.15 ms on average for it).
    """

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        """``fresh``: the journal beside it was just made, so what the file holds names jobs of
        another journal and is dropped. Nothing may truncate the file while it is mapped."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()
        self._slots: dict[int, int] = {}  # job id -> slot
        self._free: list[int] = []
        size = os.fstat(self._fd).st_size
        whole = size - size % _SLOT.size
        if whole < size:  # not a slot: zeroed, so it can never read as a job id
            os.pwrite(self._fd, bytes(size - whole), whole)
        # A crash's marks stay where they are until ``recover`` has counted them (``reset``);
        # new ones go after the last of them.
        ids = [i for (i,) in _SLOT.iter_unpack(os.pread(self._fd, whole, 0))]
        self._end = max((n + 1 for n, i in enumerate(ids) if i), default=0)
        self._map = self._mapped(max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE))
        if fresh:
            self.reset()

    def _mapped(self, size: int) -> mmap.mmap:
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        return mmap.mmap(self._fd, size)

    def set(self, job_id: int, decoding: bool) -> None:
        with self._lock:
            if decoding:
                if job_id in self._slots:
                    return
                slot = self._free.pop() if self._free else self._end
                self._end = max(self._end, slot + 1)
                if self._end * _SLOT.size > len(self._map):
                    size = 2 * len(self._map)
                    self._map.close()
                    self._map = self._mapped(size)
                _SLOT.pack_into(self._map, slot * _SLOT.size, job_id)
                self._slots[job_id] = slot
            else:
                slot = self._slots.pop(job_id, -1)
                if slot < 0:
                    return
                _SLOT.pack_into(self._map, slot * _SLOT.size, 0)
                self._free.append(slot)

    def left(self) -> list[int]:
        """The job ids marked and not cleared: what was being decoded when the process died."""
        with self._lock:
            return sorted({i for (i,) in _SLOT.iter_unpack(self._map) if i})

    def reset(self) -> None:
        """Forget every mark (once ``recover`` counted them), durably, so a power cut cannot
        count them a second time."""
        with self._lock:
            self._map[:] = bytes(len(self._map))
            self._map.flush()
            self._slots.clear()
            self._free.clear()
            self._end = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._map.close()
                os.close(self._fd)
                self._fd = -1
