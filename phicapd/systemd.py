"""systemd integration with the standard library only.

* ``Notifier``: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT_USEC)
  over ``$NOTIFY_SOCKET``; a silent no-op when systemd did not start us.
* ``WatchdogFeeder``: pings the watchdog only while the daemon's health check passes, so a
  hung CUDA call stops the pings and systemd restarts the process.
* ``listen_fds``: sockets passed by socket activation (phicapd.socket).
* ``check_roots_writable``, ``render_dropin``, ``install_unit``: the watched roots against
  ``ProtectSystem=strict``, which leaves only the paths named in ``ReadWritePaths=`` writable,
  and ``RequiresMountsFor=`` so that roots on network mounts are mounted first.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from phicapd.config import Settings
from phicapd.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_NAME = "phicapd.service"
DROPIN_NAME = "50-watch-paths.conf"
UNIT_FILES = ("phicapd.service", "phicapd.socket")
SD_LISTEN_FDS_START = 3

# ProtectHome=yes makes these inaccessible, and systemd drops any ReadWritePaths= below an
# inaccessible path; roots there need ProtectHome=read-only.
_HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset.

    Thread-safe. A failed send is logged once (warning) and never raised: losing a STATUS line
    must not take the daemon down, and a lost WATCHDOG ping is what the watchdog is for.
    """

    def __init__(self, address: str | None = None) -> None:
        self._address = _notify_address(os.environ.get("NOTIFY_SOCKET") if address is None else address)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def ready(self) -> bool:
        return self.send(READY=1)

    def reloading(self) -> bool:
        """A configuration reload starts; ``ready()`` ends it (systemd >= 253 wants the clock)."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more for the current start or stop (systemd >= 236)."""
        return self.send(EXTEND_TIMEOUT_USEC=max(1, round(seconds * 1_000_000)))

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it was sent."""
        if self._address is None or not fields:
            return False
        payload = _encode(fields)
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._address)
            except OSError as e:
                self._report(e)
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _report(self, error: OSError) -> None:
        if self._warned:
            log.debug("sd_notify failed again: %s", error)
            return
        self._warned = True
        log.warning("sd_notify to %r failed (further failures are logged at debug): %s", self._address, error)


def _notify_address(value: str | None) -> str | bytes | None:
    """``/path`` or ``@abstract``; anything else (vsock:, relative) is not for us."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX address; systemd notifications are off", value)
    return None


def _encode(fields: dict[str, object]) -> bytes:
    # One assignment per line: a newline inside a value would start a bogus assignment.
    lines = []
    for key, value in fields.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        lines.append(f"{key.upper()}={' '.join(text.splitlines())}")
    return "\n".join(lines).encode()


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None when it is not for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1_000_000 if value > 0 else None


class WatchdogFeeder:
    """A thread that sends ``WATCHDOG=1`` every half timeout while ``health_check()`` is true.

    ``health_check`` runs on this thread and must not block: it should compare progress
    timestamps, not call into the GPU (a hung CUDA call holds no lock we could wait on, so only
    "no progress lately" can detect it). An exception from it counts as unhealthy.
    ``status_text`` (optional) refreshes ``STATUS=`` on each tick, also without a watchdog.
    """

    def __init__(
        self,
        notifier: Notifier,
        health_check: Callable[[], bool],
        *,
        status_text: Callable[[], str] | None = None,
        timeout: float | None = None,
        status_period: float = 5.0,
    ) -> None:
        self._notifier = notifier
        self._health_check = health_check
        self._status_text = status_text
        self._timeout = watchdog_interval() if timeout is None else timeout
        self.period = self._timeout / 2 if self._timeout else status_period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    @property
    def active(self) -> bool:
        """Whether there is anything to send: a watchdog to feed or a status to refresh."""
        return self._notifier.enabled and (self._timeout is not None or self._status_text is not None)

    def start(self) -> None:
        if not self.active or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.period):
                return

    def tick(self) -> None:
        """One round: a ping if healthy (and a watchdog is configured), plus the status line."""
        fields: dict[str, object] = {}
        if self._timeout is not None and self._check_health():
            fields["WATCHDOG"] = 1
        if self._status_text is not None:
            text = self._safe_status()
            if text:
                fields["STATUS"] = text
        if fields:
            self._notifier.send(**fields)

    def _check_health(self) -> bool:
        try:
            healthy = bool(self._health_check())
        except Exception:
            log.exception("watchdog health check raised; treating the daemon as unhealthy")
            healthy = False
        if healthy != self._healthy:
            if healthy:
                log.info("daemon made progress again; watchdog pings resume")
            else:
                log.error("daemon made no progress; watchdog pings stop so systemd can restart it")
            self._healthy = healthy
        return healthy

    def _safe_status(self) -> str | None:
        try:
            return self._status_text() if self._status_text else None
        except Exception:
            log.exception("status_text callback raised")
            return None


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed us (``LISTEN_FDS``), in order; empty when none are for us."""
    return [sock for _, sock in listen_fds_with_names(unset_environment=unset_environment)]


def listen_fds_with_names(*, unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """Like ``listen_fds`` with each socket's ``FileDescriptorName=`` (default "unknown")."""
    pid, count, names = (os.environ.get(k, "") for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if unset_environment:
        # Children (torch's compile workers, subprocesses) must not think the fds are theirs.
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r: not an integer", count)
        return []
    labels = names.split(":") if names else []
    out = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n)):
        label = labels[i] if i < len(labels) else "unknown"
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError as e:
            log.warning("passed fd %d (%s) is unusable: %s", fd, label, e.strerror)
            continue
        if not is_socket:
            log.warning("passed fd %d (%s) is not a socket; ignoring it", fd, label)
            continue
        os.set_inheritable(fd, False)
        out.append((label, socket.socket(fileno=fd)))
    return out


def check_roots_writable(settings: Settings) -> None:
    """Create and remove a hidden probe file in each watched root; ConfigError names a failure.

    Under systemd an unlisted root is read-only (``ProtectSystem=strict``): failing at start with
    the root's name (exit 78, no restart loop) beats failing on every sidecar later.
    """
    for root in settings.watch:
        _probe_with_timeout(root.path)


PROBE_SECONDS = 10.0  # a root that does not answer in this time is a hung network mount


def _probe_with_timeout(root: Path) -> None:
    """``_probe`` in a thread of its own: a hard-mounted NFS share that hangs must not keep the
    daemon (and captioning from every other root and the socket) from starting. Such a root is
    logged and watched anyway; it settles when the share answers again."""
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            _probe(root)
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    thread = threading.Thread(target=probe, name="phicapd-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    if thread.is_alive():
        log.error("watch root %s does not answer after %.0f s (a hung network mount?); starting", root, PROBE_SECONDS)
    elif errors:
        raise errors[0]


def started_by_systemd() -> bool:
    """systemd started this process as a service (it sets ``$INVOCATION_ID``; ``$NOTIFY_SOCKET``
    for Type=notify): there a SIGHUP is ``systemctl reload``, not a terminal that closed."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


# Where the unit's PrivateTmp=yes gives the service a /tmp and /var/tmp of its own.
PRIVATE_TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
# What a write to a path the unit does not list in ReadWritePaths= fails with (ProtectSystem=
# strict makes it read-only), or what a user's permissions refuse: only these get the hint.
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_INSTALL_HINT = "; under systemd run `phicapd install-unit` to allow it (ReadWritePaths=)"


def under_private_tmp(path: Path) -> bool:
    return any(path == tmp or path.is_relative_to(tmp) for tmp in PRIVATE_TMP_DIRS)


def _missing(root: Path) -> str:
    message = f"watch root {root} does not exist"
    if under_private_tmp(root) and started_by_systemd():
        message += " (the unit's PrivateTmp=yes gives phicapd a /tmp of its own: watch a directory outside /tmp)"
    return message


def _probe(root: Path) -> None:
    try:
        is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except FileNotFoundError:
        raise ConfigError(_missing(root)) from None
    except OSError as e:
        hint = _INSTALL_HINT if e.errno in _DENIED else ""
        raise ConfigError(f"watch root {root} cannot be reached: {e.strerror}{hint}") from None
    if not is_dir:
        raise ConfigError(f"watch root {root} is not a directory")
    # Hidden, so the watcher ignores it; random, so two starts never collide.
    probe = root / f".phicapd-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        uid = os.geteuid()
        hint = _INSTALL_HINT if e.errno in _DENIED else ""
        raise ConfigError(f"watch root {root} is not writable by uid {uid}: {e.strerror}{hint}") from None


def quote_path(path: Path | str) -> str:
    """One path as a double-quoted word of a systemd path list (systemd.syntax(7)).

    Inside double quotes a backslash escapes the next character; ``%`` starts a specifier and
    is doubled. A newline cannot be written at all.
    """
    text = str(path)
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise ConfigError(f"watch root {text!r} contains a control character systemd cannot express")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render_dropin(settings: Settings) -> str:
    """The drop-in that makes the configured watched roots writable for phicapd.service, and
    orders it after the mounts they live on."""
    roots = [root.path for root in settings.watch]
    lines = [
        "# Written by `phicapd install-unit` from the [[watch]] roots of the configuration;",
        "# run it again after changing them, then: systemctl daemon-reload && systemctl restart phicapd",
    ]
    mounts_for = _mount_paths(roots)
    if mounts_for:
        # RequiresMountsFor= (systemd.unit(5)) adds Requires= and After= on the mount units that
        # systemd knows for each root and the directories above it (fstab entries, "noauto" ones
        # included, .mount files), so an NFS/SMB root is mounted before the daemon starts, which
        # could otherwise find the bare mount point at boot (exit 78, or watch the wrong
        # directory). A root on the root file system, or on a mount without a unit (mounted by
        # hand, autofs), adds nothing and never blocks the start. But a mount unit that fails
        # fails the start ("dependency failed", which Restart= does not retry), even with
        # "nofail" in fstab. No "-" prefix: this setting has none. A symlinked root also names
        # the path it resolves to, since systemd follows no symlinks here.
        lines.append("[Unit]")
        lines.extend(f"RequiresMountsFor={quote_path(path)}" for path in mounts_for)
    lines.append("[Service]")
    if any(_under_home(path) for path in roots):
        lines.append("# A watched root lies in a home directory, which ProtectHome=yes would hide.")
        lines.append("ProtectHome=read-only")
    # "-": a missing root does not fail the mount namespace setup (226/NAMESPACE); the daemon's
    # own probe then exits 78 naming it.
    lines.extend(f"ReadWritePaths={quote_path(f'-{path}')}" for path in roots)
    return "\n".join(lines) + "\n"


def check_roots_visible_to_unit(settings: Settings) -> None:
    """Refuse roots under /tmp or /var/tmp (as written or where they resolve to). The unit keeps
    PrivateTmp=yes rather than being weakened for them: a watch folder belongs somewhere that
    survives a reboot and is not shared with every user, which /tmp is neither."""
    for path in _mount_paths([root.path for root in settings.watch]):
        if under_private_tmp(path):
            tmp = next(t for t in PRIVATE_TMP_DIRS if path == t or path.is_relative_to(t))
            raise ConfigError(
                f"watch root {path} is under {tmp}, which the unit's PrivateTmp=yes replaces with a {tmp} "
                "of the service's own, so the service cannot see it; watch a directory outside /tmp and "
                "/var/tmp (such as /srv/inbox)"
            )


def _mount_paths(roots: list[Path]) -> list[Path]:
    """Each root, followed by the path it resolves to where that differs; no duplicates."""
    paths: dict[Path, None] = {}
    for root in roots:
        paths.setdefault(root)
        # realpath never raises; a missing tail is kept as written.
        paths.setdefault(Path(os.path.realpath(root)))
    return list(paths)


def _under_home(path: Path) -> bool:
    return any(path == prefix or prefix in path.parents for prefix in _HOME_PREFIXES)


def packaged_unit_files() -> list[Traversable]:
    """The unit files shipped inside the package (phicapd/data/systemd links to systemd/)."""
    base = resources.files("phicapd") / "data" / "systemd"
    return [base / name for name in UNIT_FILES]


def install_unit(
    settings: Settings, *, unit_dir: Path = Path("/etc/systemd/system"), copy_units: bool = True
) -> list[Path]:
    """Write the watch-paths drop-in (and copy the unit files); returns the paths written.

    The caller still has to run ``systemctl daemon-reload``. A root the unit cannot see (under
    /tmp or /var/tmp, which its PrivateTmp=yes replaces) is a ``ConfigError`` before anything is
    written: the service would only find that it does not exist.
    """
    check_roots_visible_to_unit(settings)
    written = []
    if copy_units:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for source in packaged_unit_files():
            target = unit_dir / source.name
            _write_atomic(target, source.read_text(encoding="utf-8"))
            written.append(target)
    dropin_dir = unit_dir / f"{SERVICE_NAME}.d"
    dropin_dir.mkdir(parents=True, exist_ok=True)
    target = dropin_dir / DROPIN_NAME
    _write_atomic(target, render_dropin(settings))
    written.append(target)
    return written


def _write_atomic(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, target)


__all__ = [
    "Notifier",
    "WatchdogFeeder",
    "check_roots_visible_to_unit",
    "check_roots_writable",
    "install_unit",
    "listen_fds",
    "listen_fds_with_names",
    "packaged_unit_files",
    "quote_path",
    "render_dropin",
    "watchdog_interval",
]
