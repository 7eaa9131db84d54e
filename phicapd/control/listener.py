"""The listening Unix socket: bind it safely, never steal a live one, read peer credentials.

The socket is bound inside a private (0700) temporary directory next to its final path,
given mode 0660 and its group there, and only then renamed into place: no moment exists in
which the final path carries looser permissions (a chmod after bind would race, and changing
the umask is process-wide and would race with the daemon's other threads).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phicapd.errors import ConfigError, PhicapError

SOCKET_MODE = 0o660
_PROBE_TIMEOUT = 1.0
_UCRED = struct.Struct("3i")


class SocketInUseError(PhicapError):
    """The socket path belongs to a live server, or is something other than a socket."""

    code = "control_socket_in_use"


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class BoundSocket:
    sock: socket.socket
    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we created


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The connecting process as the kernel saw it at ``connect()`` time (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid, uid, gid)


def is_live(path: Path) -> bool:
    """Does a server accept connections on ``path``? Unknown (no permission, busy) counts as live."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    else:
        return True
    finally:
        probe.close()


def resolve_group(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"control.socket_group: no group named {name!r}") from None


def _prepare_directory(directory: Path, gid: int | None) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o750 if gid is not None else 0o700)
        if gid is not None:
            os.chown(directory, -1, gid)
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"control.socket: {directory} is not a directory")
    foreign_owner = st.st_uid not in (0, os.geteuid())
    open_to_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if foreign_owner or open_to_others:
        # Someone else could swap the socket for their own and read every client's images.
        raise ConfigError(
            f"control.socket: directory {directory} is writable by other users or owned by uid "
            f"{st.st_uid}; use a private directory such as $XDG_RUNTIME_DIR"
        )


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise check-and-replace between two servers starting in the same directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def bind_unix_socket(path: Path, *, group: str | None = None, backlog: int = 128) -> BoundSocket:
    """Bind and listen on ``path`` with mode 0660 (and ``group``), replacing only a stale socket.

    Raises ``SocketInUseError`` when a live server answers on ``path`` or the path is not a socket.
    """
    gid = resolve_group(group) if group else None
    _prepare_directory(path.parent, gid)
    private = Path(tempfile.mkdtemp(prefix=".phicapd-", dir=path.parent))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staging = private / "s"
        try:
            sock.bind(os.fspath(staging))
        except OSError as e:
            raise PhicapError(f"cannot bind the control socket near {path}: {e}", code="control_bind") from e
        os.chmod(staging, SOCKET_MODE)
        if gid is not None:
            os.chown(staging, -1, gid)
        sock.listen(backlog)
        with _directory_lock(path.parent):
            _check_replaceable(path)
            os.rename(staging, path)
        st = path.lstat()
        return BoundSocket(sock, path, (st.st_dev, st.st_ino))
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
    if is_live(path):
        raise SocketInUseError(f"another server is answering on {path}; refusing to take its socket over")


def unlink_if_ours(bound: BoundSocket) -> None:
    """Remove the socket file on shutdown unless another server has replaced it since."""
    try:
        st = bound.path.lstat()
    except OSError:
        return
    if (st.st_dev, st.st_ino) == bound.identity:
        with contextlib.suppress(OSError):
            bound.path.unlink()
