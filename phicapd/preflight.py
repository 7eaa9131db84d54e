"""What ``phicapd run`` refuses before anything starts, and ``phicapd check-config`` with it.

A state directory or socket directory the daemon cannot use would otherwise surface as a
traceback from deep inside SQLite or the socket code. Here it is one line naming the key and the
path, a ``ConfigError`` (exit 78, which systemd does not restart). ``check_startup`` is what
``run`` checks before the socket comes up; ``check_backend`` is what the model load refuses
before it reads a weight or asks an endpoint. ``check-config`` runs both, so it rejects what
``run`` would, with the same message and exit code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from phicapd.config import Settings
from phicapd.errors import ConfigError


def _nearest_existing(directory: Path) -> Path:
    """``directory`` or its closest ancestor that exists (where ``mkdir -p`` would start)."""
    path = directory
    while True:
        try:
            path.stat()
            return path
        except FileNotFoundError:
            if path.parent == path:
                return path
            path = path.parent


def directory_problem(directory: Path) -> str | None:
    """Why this process cannot create files in ``directory`` (making it first if missing), or None.

    It tries for real, with an empty hidden directory it removes at once: ``os.access`` says yes
    to root on /proc and knows nothing of read-only mounts or the systemd sandbox."""
    base = directory
    try:
        base = _nearest_existing(directory)
        if not base.is_dir():
            return f"{base} is not a directory"
        os.rmdir(tempfile.mkdtemp(prefix=".phicapd-probe-", dir=base))
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e)).lower()
        where = directory if base == directory else f"{base} (to make {directory})"
        return f"cannot create files in {where}: {reason} as uid {os.geteuid()}"
    return None


def check_state_paths(settings: Settings, *, socket_inherited: bool = False) -> None:
    """Raise ``ConfigError`` naming ``[state] dir`` or ``[control] socket`` if it cannot be used.

    ``socket_inherited``: systemd passed the listening socket in, so its directory is not ours."""
    checks = [("[state] dir", settings.state.dir, settings.state.dir)]
    if not socket_inherited:
        checks.append(("[control] socket", settings.control.socket, settings.control.socket.parent))
    for key, value, directory in checks:
        if (problem := directory_problem(directory)) is not None:
            raise ConfigError(f"{key} = {value}: {problem}")


def check_startup(settings: Settings, *, socket_inherited: bool = False) -> None:
    """Everything ``run`` checks before it starts: the watched roots (exist, writable), then the
    state and socket directories."""
    from phicapd.systemd import check_roots_writable

    check_roots_writable(settings)
    check_state_paths(settings, socket_inherited=socket_inherited)


def check_backend(settings: Settings) -> str | None:
    """What loading the configured backend refuses short of loading weights or asking an endpoint
    (the same functions raise the same errors there). Returns a note for the user, or None."""
    if settings.model.backend == "openai":
        from phicapd.remote.captioner import check_remote

        check_remote(settings.remote)
        return None
    from phicapd.model.loading import check_model

    return check_model(settings.model)
