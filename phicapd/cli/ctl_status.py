"""phicapctl's reports: status (what is left and when it will be done first, then the raw
counters), health (an exit code a monitoring probe reads) and failures."""

from __future__ import annotations

import argparse
from typing import Any

from phicapd.cli.output import flatten, print_json
from phicapd.control import batch
from phicapd.control.client import ControlClient


def _duration(seconds: float) -> str:
    """A time a person reads at a glance: 40 s, 12 min, 3 h 05 min, 2.5 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02} min"
    return f"{seconds / 86400:.1f} days"


def _images(n: int) -> str:
    return f"{n:,} image" if n == 1 else f"{n:,} images"


def _progress_lines(status: dict[str, Any]) -> list[tuple[str, str]]:
    """What is left and when it will be done, from ``progress`` (absent from older daemons)."""
    progress = status.get("progress")
    if not isinstance(progress, dict):
        return []
    backlog, rate, eta = progress.get("backlog", 0), progress.get("images_per_second", 0), progress.get("eta_seconds")
    runnable, retrying = progress.get("runnable", backlog), progress.get("retrying", 0)
    state = status.get("state")
    # A daemon that predates "no_eta" says nothing of it; its state still does.
    no_eta = progress.get("no_eta") or (state if state in ("paused", "waiting") else None)
    retry = ""
    if retrying:
        after = progress.get("next_retry_in_seconds")
        retry = f"{_images(retrying)} waiting to be retried" + (f", the first in {_duration(after)}" if after else "")
    if not backlog:
        left = "nothing queued"
    elif no_eta == "paused":
        left = f"{_images(backlog)}; paused, so no estimate (`phicapctl resume` goes on)"
    elif no_eta == "waiting":
        left = f"{_images(backlog)}; no estimate while every remote endpoint is down (model.waiting says why)"
    elif no_eta == "retrying" or not runnable:
        left = retry or f"{_images(backlog)} waiting to be retried"
    elif eta is None:
        left = f"{_images(runnable)}; no estimate yet (nothing captioned in the last 5 min)"
    else:
        left = f"{_images(runnable)}, done in about {_duration(eta)} at {rate:.3g} images/s while busy"
    if retry and left != retry and no_eta not in ("paused", "waiting"):
        left += f"; {retry}"
    failures = progress.get("failures_by_code") or {}
    failed = "  ".join(f"{code}={n:,}" for code, n in failures.items()) or "none"
    return [("left", left), ("failures", failed)]


def _records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _loading_reason(status: dict[str, Any]) -> str | None:
    """Why the model is not ready yet (taken out of the table: it is a sentence, not a counter)."""
    model = status.get("model")
    return model.pop("loading", None) if isinstance(model, dict) else None


def cmd_status(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.status().model_dump()
    if args.json:
        print_json(status)
        return batch.EX_OK
    if reason := _loading_reason(status):
        print(f"not ready: {reason}")
    if refused := (status.pop("config", None) or {}).get("reload_refused"):
        # Until a reload succeeds the daemon runs an older configuration than the file's.
        print(f"config: reload refused at {flatten(refused.get('at'), 'at')}: {refused.get('reason')}")
    # First what a person asks (how much is left, when, what failed), then the raw counters.
    progress = _progress_lines(status)  # before the state is taken out: it reads it (paused, waiting)
    lines: list[tuple[str, Any]] = [("state", status.pop("state")), *progress]
    status.pop("progress", None)
    # Nested sections (the model's engine counters) get lines of their own.
    for key, value in status.items():
        if isinstance(value, dict):
            # ... and so do lists of records (the remote backend's endpoints), one line each.
            nested = {k: v for k, v in value.items() if isinstance(v, dict) or _records(v)}
            lines.append((key, {k: v for k, v in value.items() if k not in nested}))
            lines += [(f"  {k}", v) for k, v in nested.items()]
        else:
            lines.append((key, value))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {flatten(value)}")
        if isinstance(value, list):
            for item in value:
                print(f"{'':<{width}}  - {flatten(item)}")
    return batch.EX_OK


def cmd_health(client: ControlClient, args: argparse.Namespace) -> int:
    # 0 only when a caption can be made now: a loaded model behind endpoints that are all down
    # is not healthy to a monitoring probe. A daemon that predates "captioning" has only "ready".
    reply = client.health_reply()
    captioning = reply.ready if reply.captioning is None else reply.captioning
    state = reply.state or ("ready" if reply.ready else "loading")
    line = state if captioning else f"{state}: cannot caption now"
    if reply.reason:
        line += f" ({reply.reason})"
    elif state == "paused":
        line += " (socket requests are captioned; watched directories wait for `phicapctl resume`)"
    print(line)
    return batch.EX_OK if captioning else batch.EX_UNAVAILABLE


def cmd_failures(client: ControlClient, args: argparse.Namespace) -> int:
    rows = client.failures(args.limit)
    if args.json:
        print_json(rows)
        return batch.EX_OK
    if not rows:
        print("no failures")
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("path", "code")}
        print(f"{row.get('path', '?')}  {row.get('code', '?')}  {flatten(rest)}")
    return batch.EX_OK
