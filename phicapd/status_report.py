"""The document ``phicapctl status`` shows (``control.protocol.StatusReply``), from the daemon's parts.

The journal, the intake and the settings exist from the start; the model section says what is
loaded; ``Activity`` is the running pipeline's part (the scheduler's lanes and rates, the
writer's sources, the watcher), ``IDLE`` while the model loads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phicapd import __version__
from phicapd.captioner import Captioner
from phicapd.config import Settings
from phicapd.lifecycle import Lifecycle
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.journal import Journal
from phicapd.pipeline.progress import Backlog, progress_report
from phicapd.pipeline.reconciler import Reconciler

#: A caption's source as the writer counts them: (backend, endpoint, server-reported model).
Source = tuple[str, str | None, str]


@dataclass(frozen=True)
class Activity:
    """What the running pipeline reports."""

    lanes: Mapping[str, int] = field(default_factory=dict)
    images_per_second: float = 0.0  # over the last minute
    captions_total: int = 0
    batches_total: int = 0
    backlog_rate: tuple[float, float] = (0.0, 0.0)  # background captions per busy second, busy seconds
    recent_failures: list[dict[str, Any]] = field(default_factory=list)
    captions_by_source: Mapping[Source, int] = field(default_factory=dict)
    watcher_pending: int = 0
    unresponsive_roots: list[str] = field(default_factory=list)


IDLE = Activity()


def model_source(settings: Settings) -> str:
    """Where the captions come from, for messages: the native model's source or the endpoints."""
    if settings.model.backend == "openai":
        return f"{settings.remote.model} at {', '.join(settings.remote.endpoints)}"
    return settings.model.source


def model_section(
    settings: Settings, lifecycle: Lifecycle, captioner: Captioner | None, max_batch: int | None = None
) -> tuple[dict[str, Any], Any]:
    """``status``'s "model" and "gpu": what is loaded (``captioner``, None while it loads) and the
    backend's own description. ``max_batch``: the scheduler's, once there is one."""
    if captioner is None:
        return {"source": model_source(settings), "loaded": False, "loading": lifecycle.loading}, None
    details = captioner.describe()
    model: dict[str, Any] = {
        "source": model_source(settings),
        "loaded": True,
        "identity": captioner.identity,
        "max_batch": max_batch or captioner.max_batch,
    }
    return {**model, **{k: v for k, v in details.items() if k != "gpu"}}, details.get("gpu")


def status_document(
    settings: Settings,
    lifecycle: Lifecycle,
    store: Journal,
    intake: Intake,
    reconciler: Reconciler,
    *,
    state: str,
    model: tuple[dict[str, Any], Any],
    activity: Activity,
) -> dict[str, Any]:
    """The whole ``status`` reply; ``state`` as ``ControlBackend.status`` documents it."""
    counts = store.counts()
    return {
        "state": state,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - lifecycle.started_at, 1),
        "model": model[0],
        "gpu": model[1],
        "lanes": {**activity.lanes, **intake.backlog()},
        "journal": counts,
        "throughput": {
            "images_per_second_1m": round(activity.images_per_second, 3),
            "captions_total": activity.captions_total,
            "batches_total": activity.batches_total,
        },
        "progress": _progress(store, counts, state, activity.backlog_rate),
        "recent_failures": activity.recent_failures,
        # Which backend, endpoint and server-reported model made the captions since start.
        "captions_by_source": [
            {"backend": b, "endpoint": e, "model": m, "captions": n}
            for (b, e, m), n in sorted(activity.captions_by_source.items(), key=lambda kv: str(kv[0]))
        ],
        # The running configuration, and a reload refused since it was applied.
        "config": {"reload_refused": lifecycle.reload_refused},
        "watch": [str(r.path) for r in settings.watch],
        "max_body_bytes": settings.control.max_body_bytes,  # phicapctl refuses larger files unread
        "watcher_pending": activity.watcher_pending,
        "unresponsive_roots": activity.unresponsive_roots,
        # Image files the last full scan of a root passed over: no installed decoder reads them.
        "unreadable": reconciler.unreadable.report([r.path for r in settings.watch]),
        # A root whose last scan failed is not being caught up: shown until a scan succeeds.
        "scan_failed": intake.scan_failures(),
        "sidecar": {
            "extension": settings.sidecar.extension,
            "existing": settings.sidecar.existing,
            "formats": list(settings.sidecar.formats),
            "xmp_naming": settings.sidecar.xmp_naming,
            "restale": settings.sidecar.restale,
        },
        # What each root writes and keeps, with its own settings applied.
        "outputs": [
            {
                "root": str(r.path),
                "formats": list(settings.formats_for(r)),
                "existing": settings.existing_policy(r),
                "restale": settings.restale_for(r),
            }
            for r in settings.watch
        ],
    }


def _progress(store: Journal, counts: dict[str, int], state: str, rate: tuple[float, float]) -> dict[str, Any]:
    """How much is left and when it will be done: what a person asks first (``pipeline.progress``)."""
    retrying, next_retry_in = store.backing_off()
    retrying = min(retrying, counts["pending"])  # two reads: a job may have turned due between them
    backlog = Backlog(counts["pending"] - retrying + counts["running"], retrying, next_retry_in)
    # Parked and waiting to be retried, as ``phicapctl failures`` lists them.
    by_code: dict[str, int] = {}
    for _, code, jobs in store.failure_counts():
        by_code[code] = by_code.get(code, 0) + jobs
    return {
        **progress_report(backlog, *rate, state),
        "failures_by_code": dict(sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
