"""What a configuration reload (SIGHUP, ``systemctl reload phicapd``) may change in a running daemon.

Rules:

* Live: the ``[[watch]]`` roots (added, removed, or changed: prompt, prefix, suffix, patterns,
  ``existing``, ``recursive``, ``poll``), ``[sidecar] existing``, ``[fetch]``, ``[log] level``
  and ``[scheduler]`` but for ``decode_workers``. The model stays loaded.
* Everything else needs a restart: ``[model]`` (the loaded weights and their prompt, the
  backend), ``[remote]`` (the endpoint pool is built at start), the control
  socket, the journal's directory, the decoders' ``[imaging]`` limits, ``[watcher]`` timings,
  ``[scheduler] decode_workers`` (the pools are sized at start), ``[sidecar] extension`` (every
  existing sidecar's name) and ``[log] format``. Such a change is kept out of the running
  settings and named in the log, so the file and the daemon differ only until that restart.
* A file that does not load (syntax, unknown key, bad value) changes nothing at all.
"""

from __future__ import annotations

from phicapd.config import Settings

#: Sections (or ``section.key``) that only a restart applies.
RESTART_ONLY = (
    "model",
    "remote",
    "control",
    "state",
    "imaging",
    "watcher",
    "scheduler.decode_workers",
    "sidecar.extension",
    "log.format",
)


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """The settings that differ between ``old`` and ``new`` and need a restart, as dotted keys."""
    changed: list[str] = []
    for key in RESTART_ONLY:
        section, _, field = key.partition(".")
        a, b = getattr(old, section), getattr(new, section)
        if field:
            if getattr(a, field) != getattr(b, field):
                changed.append(key)
            continue
        for name in type(a).model_fields:
            if getattr(a, name) != getattr(b, name):
                changed.append(f"{section}.{name}")
    return changed


def live_settings(old: Settings, new: Settings) -> Settings:
    """``new`` with everything that needs a restart kept as it runs now (``old``)."""
    return new.model_copy(
        update={
            "model": old.model,
            "remote": old.remote,
            "control": old.control,
            "state": old.state,
            "imaging": old.imaging,
            "watcher": old.watcher,
            "scheduler": new.scheduler.model_copy(update={"decode_workers": old.scheduler.decode_workers}),
            "sidecar": new.sidecar.model_copy(update={"extension": old.sidecar.extension}),
            "log": new.log.model_copy(update={"format": old.log.format}),
        }
    )
