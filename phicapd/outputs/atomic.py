"""Atomic writes of output files: a reader sees the old file or the new one, never half of one.

Each file is written to a hidden temp file in its directory (``temp_path``; the scans and the
watcher skip such names: ``is_temp_name``), fsynced, renamed over the target, and the directory
is fsynced, so a crash leaves either the old output or the new one. A target that is not a
regular file (a symbolic link, a named pipe) is refused, not replaced (``safe_files``). Temp
files carry their writer's pid, so one a killed writer left behind is removed at the next scan
(``remove_stale_temps``) while a live writer's (phicapctl's) is kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from phicapd.outputs.safe_files import check_replaceable

TEMP_MARKER = ".phicapd-"
NAME_MAX = 255  # bytes in one file name (Linux, every common filesystem)
TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARKER in name and name.endswith(TEMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (e.g. certain FUSE mounts) refuse directory fsync
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def temp_path(target: Path) -> Path:
    """A hidden temp name beside ``target`` that the scans and the watcher skip (``is_temp_name``)."""
    tail = os.fsencode(f"{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")
    # A name is at most 255 bytes: the target's part is cut to fit (its bytes, not its
    # characters, so a cut inside a UTF-8 sequence is still a valid name).
    head = os.fsencode(target.name)[: NAME_MAX - 1 - len(tail)]
    return target.parent / os.fsdecode(b"." + head + tail)


def _write_temp(target: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new temp file beside ``target`` and fsync it; returns the temp path."""
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp


def _rename_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` over ``target``, unless what stands there is not a file of ours to replace
    (``safe_files.check_replaceable``: a link, a pipe): then ``RefusedFile``, ours dropped."""
    try:
        check_replaceable(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _link_into_place(tmp: Path, target: Path) -> None:
    """Like ``_rename_into_place``, but an existing ``target`` wins: FileExistsError, ours dropped.

    A hard link is as atomic as a rename and fails instead of replacing. Where the filesystem
    has no hard links, an existence check and a rename leave a window of a few microseconds.
    """
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "the sidecar exists", str(target)) from None
            os.replace(tmp, target)
            return
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    tmp.unlink()


def write_atomic(target: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``target`` so that readers see the old file or the new one, never a mix."""
    _rename_into_place(_write_temp(target, text.encode("utf-8"), mode), target)
    fsync_dir(target.parent)


def _caption_bytes(caption: str) -> bytes:
    """A caption ends with one newline, as text tools expect."""
    return (caption.rstrip("\n") + "\n").encode("utf-8")


def write_sidecar(sidecar: Path, caption: str) -> None:
    """Write one caption atomically (see ``write_sidecars``)."""
    (error,) = write_sidecars([(sidecar, caption)])
    if error is not None:
        raise error


def write_sidecars(
    items: Sequence[tuple[Path, str]], pool: Executor | None = None, keep: Collection[Path] = ()
) -> list[OSError | None]:
    """Write many sidecars atomically; returns, per item, ``None`` or the error that stopped it.

    A target in ``keep`` is not replaced if it exists by the time ours is ready (another writer,
    a person): its error is then a ``FileExistsError``.

    The same protocol as ``write_atomic``, grouped: each file is written to its temp file,
    fsynced and renamed into place as one task in ``pool``, then each directory is fsynced once
    for the whole group instead of once per file. Running the tasks side by side matters more
    than anything else here: fsync releases the GIL, and the filesystem commits concurrent
    fsyncs together (ext4 turns many of them into one journal commit and one cache flush).
    """

    def place(item: tuple[Path, str]) -> OSError | None:
        target, caption = item
        into_place = _link_into_place if target in keep else _rename_into_place
        try:
            into_place(_write_temp(target, _caption_bytes(caption), 0o644), target)
        except OSError as e:
            return e
        return None

    results = _map(place, items, pool)
    directories = sorted({target.parent for (target, _), r in zip(items, results, strict=True) if r is None})
    failed_dirs = {d: e for d, e in zip(directories, _map(_fsync_dir_or_error, directories, pool), strict=True) if e}
    if failed_dirs:
        results = [
            failed_dirs.get(target.parent, r) if r is None else r for (target, _), r in zip(items, results, strict=True)
        ]
    return results


def _fsync_dir_or_error(directory: Path) -> OSError | None:
    try:
        fsync_dir(directory)
    except OSError as e:
        return e
    return None


def _map(fn: Callable[[Any], OSError | None], items: Sequence[Any], pool: Executor | None) -> list[OSError | None]:
    if pool is None or len(items) < 2:
        return [fn(i) for i in items]
    return list(pool.map(fn, items))


def _writer_alive(name: str) -> bool:
    """Temp names carry the writer's pid; a live writer (say phicapctl) keeps its file."""
    try:
        pid = int(name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files that a killed writer left behind in ``directory``; returns how many.

    A temp file of this process or of another live process is in use and is kept.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if is_temp_name(entry.name) and not _writer_alive(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed
