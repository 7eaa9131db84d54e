"""Files beside an image, opened safely: only regular files, bounded, never a blocked thread.

Whatever lies beside an image is the owner's, not ours, and may be anything: a named pipe (an
``open()`` that waits for a writer for ever), a device (``/dev/zero`` reads without end), a
socket, a directory, or a symbolic link to any of those or to a file outside the tree. Every
sidecar (``.txt``, ``.json``, ``.xmp``), every ``metadata.jsonl`` and every image phicapd reads or
replaces goes through here:

* reading (``open_regular``, ``read_bytes``, ``read_text``, ``copy_regular``): the path is
  stat'ed first, so a device is never even opened; then it is opened ``O_NONBLOCK`` (a pipe
  swapped in since cannot block the open) and ``fstat``'ed, and anything but a regular file is
  refused at once; a file over its kind's cap is refused before a byte is read, and a read stops
  at the cap should the file grow meanwhile. Reads follow symbolic links (a symlinked image is
  captioned like a file, README "Watching"), unless the caller will replace what it read.
* moving (``rename_noreplace``): an output that follows its renamed image takes its new name
  atomically, never over a file that stands there, and a link is moved as the link it is.
* replacing (``check_replaceable``): an output is written to a temp file and renamed over its
  target, and a rename never follows a link; but a target that exists and is not a regular file
  (a link, a pipe, a directory) is not ours to replace either: it is refused.

A refusal is a ``RefusedFile``, an ``OSError`` whose ``code`` (``errors.SIDECAR_NOT_REGULAR``,
``errors.SIDECAR_TOO_LARGE``) the writer records as the image's failure (parked: the file will
not change by itself). It names the file and says what it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
from pathlib import Path

from phicapd.errors import SIDECAR_NOT_REGULAR, SIDECAR_TOO_LARGE

MiB = 1024 * 1024
#: A ``.txt`` or ``.json`` sidecar: one caption (a few hundred bytes; ``max_new_tokens`` tokens at
#: most) and, for JSON, its provenance. A file a thousand times larger is no caption of ours.
TEXT_MAX_BYTES = 1 * MiB
#: An XMP sidecar: darktable's history or Lightroom's develop settings reach a few hundred KiB;
#: the packet is parsed whole by exiv2, so this bounds the worker's memory too.
XMP_MAX_BYTES = 16 * MiB
#: A ``metadata.jsonl``: one line per image of the directory, about 100 bytes plus the caption;
#: 100,000 images with 1 KiB captions are ~110 MB. It is read whole and parsed at every rewrite.
MANIFEST_MAX_BYTES = 128 * MiB
#: An image copied to embed a caption into it, or hashed again: a ceiling for paths that have no
#: ``[imaging] max_file_bytes`` at hand (the decoder refused anything over that before).
IMAGE_MAX_BYTES = 1024 * MiB

_CHUNK = 1 * MiB


class RefusedFile(OSError):
    """A file phicapd will not read or replace: not a regular file, or over its cap."""

    def __init__(self, path: Path | str, code: str, reason: str) -> None:
        super().__init__(errno.EINVAL if code == SIDECAR_NOT_REGULAR else errno.EFBIG, reason, str(path))
        self.code = code

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "a special file"


def _not_regular(path: Path | str, mode: int) -> RefusedFile:
    return RefusedFile(path, SIDECAR_NOT_REGULAR, f"{_kind(mode)}, not a regular file")


def _too_large(path: Path | str, size: int | None, max_bytes: int) -> RefusedFile:
    size_text = f"{size} bytes" if size is not None else "more bytes"
    return RefusedFile(path, SIDECAR_TOO_LARGE, f"{size_text}, over the limit of {max_bytes} for this kind of file")


def open_regular(path: Path | str, max_bytes: int, *, follow: bool = True) -> tuple[int, os.stat_result]:
    """An open read-only descriptor of the regular file ``path`` (at most ``max_bytes`` long now),
    and its ``fstat``. ``follow=False``: a symbolic link is refused too. ``FileNotFoundError``
    and other ``OSError``s as ``os.open`` raises them; ``RefusedFile`` for the rest."""
    st = os.stat(path, follow_symlinks=follow)  # a device is refused unopened
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:  # became a link since the stat
            raise _not_regular(path, stat.S_IFLNK) from None
        raise
    try:
        st = os.fstat(fd)  # what was opened, whatever the path holds by now
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size > max_bytes:
            raise _too_large(path, st.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, path: Path | str, max_bytes: int) -> bytes:
    """The rest of ``fd``, refused once it passes ``max_bytes`` (the file grew since its fstat)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(path, None, max_bytes)


def read_bytes(path: Path | str, max_bytes: int, *, follow: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` (see ``open_regular``)."""
    fd, _ = open_regular(path, max_bytes, follow=follow)
    try:
        return read_fd(fd, path, max_bytes)
    finally:
        os.close(fd)


def read_text(path: Path | str, max_bytes: int, *, errors: str = "strict") -> str:
    """The UTF-8 text of the regular file ``path`` (``UnicodeDecodeError`` under ``strict``)."""
    return read_bytes(path, max_bytes).decode("utf-8", errors)


def copy_regular(source: Path, target: Path, max_bytes: int) -> os.stat_result:
    """Copy the regular file ``source`` (never through a link: the copy replaces it) to the new
    file ``target`` with ``source``'s permission bits; returns the ``fstat`` of what was copied.
    ``target`` must not exist (``O_EXCL``); on an error it is left for the caller to remove."""
    fd, st = open_regular(source, max_bytes, follow=False)
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, stat.S_IMODE(st.st_mode))
        try:
            total = 0
            while chunk := os.read(fd, _CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(source, None, max_bytes)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            os.fchmod(out, stat.S_IMODE(st.st_mode))  # the umask may have narrowed O_CREAT's mode
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return st


def check_replaceable(target: Path) -> None:
    """Refuse to replace ``target`` unless it is missing or a regular file (not a link to one):
    what stands there otherwise is not an output of ours."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(target, st.st_mode)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: What a filesystem without ``RENAME_NOREPLACE`` (or without hard links) answers.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EMLINK})


@functools.cache
def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl): the fallback
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return function


def rename_noreplace(source: Path, target: Path) -> None:
    """Give ``source`` the name ``target`` unless something stands there (``FileExistsError``).

    ``renameat2(RENAME_NOREPLACE)``: atomic, one name or the other. Where the filesystem lacks
    it, a hard link then an unlink: a crash in between leaves both names on one file, which a
    redo of the move recognises (``os.path.samefile``). Across filesystems (``EXDEV``) the file
    is copied under a temp name, linked to ``target`` without replacing, then ``source`` removed.
    Nothing here follows a link: a link would be moved as the link it is, so callers refuse one.
    """
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED and code != errno.EXDEV:
            raise OSError(code, os.strerror(code), str(target))  # EEXIST: a FileExistsError
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EXDEV:
            _copy_noreplace(source, target)
            os.unlink(source)
            return
        if e.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(target):  # no hard links here: a check, then the rename
            raise FileExistsError(errno.EEXIST, "a file stands there", str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def _copy_noreplace(source: Path, target: Path) -> None:
    """Copy the regular file ``source`` to ``target`` (on another filesystem) without replacing."""
    # A temp name as ``atomic.temp_path`` makes them, which the scans skip and clean up.
    head = os.fsdecode(os.fsencode(target.name)[:200])
    temp = target.with_name(f".{head}.phicapd-{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        copy_regular(source, temp, IMAGE_MAX_BYTES)
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
