"""The memory the decode workers hand pixels back through: one anonymous shared file (a memfd)
per worker, mapped by the daemon and by the worker.

A pipe would copy every pixel through the kernel in 64 KiB pieces (a 12 MP photo is 36 MB of
RGB); here the worker writes the pixels once into the mapping and the daemon copies them once
into its image. Socket uploads go the other way through the same buffer. Only one side touches
it at a time (the other waits for its request or answer), and the side that needs more room
grows the file: a mapping longer than the file would fault (SIGBUS) past its end, so each side
checks the file's size before it touches more than it knows to be there.
"""

from __future__ import annotations

import mmap
import os

#: Room kept between requests: above this, the file is cut back after use so that one huge
#: image does not keep its pixels' worth of memory per worker for good.
KEEP_BYTES = 128 * 1024 * 1024


class SharedPixels:
    """A view of the shared file ``fd`` (the caller owns and closes ``fd``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None

    @staticmethod
    def create() -> int:
        """A new shared file (close-on-exec: a worker gets it through ``pass_fds``)."""
        return os.memfd_create("phicapd-decode", os.MFD_CLOEXEC)

    def view(self, size: int) -> memoryview:
        """The first ``size`` bytes, growing the file if it is shorter. Valid until the next call."""
        length = os.fstat(self.fd).st_size
        if length < size:
            length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            os.ftruncate(self.fd, length)
        if self._map is None or len(self._map) < size:
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self.fd, length)
        return memoryview(self._map)[:size]

    def trim(self) -> None:
        """Give back what is over ``KEEP_BYTES`` (every view must be released)."""
        if os.fstat(self.fd).st_size > KEEP_BYTES:
            if self._map is not None:
                self._map.close()
                self._map = None
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
