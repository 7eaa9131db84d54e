"""What the control socket serves (``control.backend.ControlBackend``), apart from the lifecycle.

The socket answers from the start, while the model loads: ``LoadingApi`` stands in then, from
the parts that exist before the model (journal, intake, settings): status and health say what
loads, the journal's endpoints (failures, retry, sidecar policy, captioned) work, and a caption
waits for the model within its timeout. Once the pipeline runs, ``service.Daemon`` serves a
``ControlApi`` built from every part instead; nothing in it is ever missing.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from phicapd.caption_form import root_form
from phicapd.captioner import Captioner
from phicapd.client_outputs import ClientOutputs
from phicapd.config import Settings, WatchRoot
from phicapd.control.backend import CaptionReply
from phicapd.errors import CAPTION_TIMEOUT, NOT_READY, NOT_WATCHED, REMOTE_UNAVAILABLE, PhicapError
from phicapd.lifecycle import Lifecycle
from phicapd.log import get_logger
from phicapd.metrics import DaemonMetrics
from phicapd.outputs.provenance import generation_settings, model_and_revision, settings_key
from phicapd.pipeline import staleness
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.journal import Job, Journal
from phicapd.pipeline.paths import journal_path, owning_root
from phicapd.pipeline.reconciler import Reconciler
from phicapd.pipeline.scheduler import Scheduler
from phicapd.pipeline.watcher import Watcher
from phicapd.pipeline.writer import SidecarWriter
from phicapd.status_report import IDLE, Activity, model_section, status_document

log = get_logger(__name__)


def _still_loading() -> PhicapError:
    return PhicapError("the model is still loading", code=NOT_READY, retryable=True)


class _JournalApi:
    """The endpoints that need only the journal, the intake and the settings."""

    def __init__(
        self,
        settings: Settings,
        lifecycle: Lifecycle,
        store: Journal,
        intake: Intake,
        reconciler: Reconciler,
        metrics: DaemonMetrics,
        outputs: ClientOutputs,
    ) -> None:
        self.settings = settings  # the live settings: the daemon hands a reload's here too
        self.lifecycle = lifecycle
        self.store = store
        self.intake = intake
        self.reconciler = reconciler
        self.prometheus = metrics
        self.outputs = outputs

    def is_ready(self) -> bool:
        return self.lifecycle.is_ready()

    def wait_ready(self, timeout: float) -> bool:
        return self.lifecycle.wait_ready(timeout)

    def sidecar_policy(self, path: Path) -> dict[str, Any]:
        return self.outputs.sidecar_policy(self.settings, path)

    def captioned(
        self,
        path: Path,
        *,
        sidecar: str | None,
        caption: str,
        sha256: str,
        model: str,
        backend: str | None,
        prompt: str,
        settings_key: str,
    ) -> bool:
        return self.outputs.record(
            self.settings,
            path,
            sidecar=sidecar,
            caption=caption,
            sha256=sha256,
            model=model,
            backend=backend,
            prompt=prompt,
            settings_key=settings_key,
        )

    def failures(self, limit: int) -> list[dict[str, Any]]:
        return [
            {
                "path": str(j.path),
                "state": j.state.value,
                "attempts": j.attempts,
                "code": j.error_code,
                "message": j.error_message,
                "updated_at": j.updated_at,
            }
            for j in self.store.failures(limit)
        ]

    def retry(self, paths: list[str] | None) -> int:
        n = self.store.retry(paths)
        self._work_queued()
        return n

    def rescan(self) -> None:
        for root in self.settings.watch:
            self.intake.rescan(root, root.path, "request")

    def metrics(self) -> str:
        return self.prometheus.render()

    def _work_queued(self) -> None:
        """Jobs were queued in the journal: the scheduler, if one runs, claims them now."""

    def _health(self, state: str, reason: str | None) -> dict[str, Any]:
        ready = self.is_ready()
        if not ready:
            reason = self.lifecycle.loading if state == "loading" else f"the daemon is {state}"
        return {"ready": ready, "captioning": ready and reason is None, "state": state, "reason": reason}


class LoadingApi(_JournalApi):
    """Stands in while the model loads (and, if it never loaded, while the daemon stops)."""

    #: Set once the model is loaded, while it warms up: status shows it.
    captioner: Captioner | None = None

    def health(self) -> dict[str, Any]:
        return self._health(self.lifecycle.phase, None)

    def status(self) -> dict[str, Any]:
        parts = (self.settings, self.lifecycle, self.store, self.intake, self.reconciler)
        model = model_section(self.settings, self.lifecycle, self.captioner)
        return status_document(*parts, state=self.lifecycle.phase, model=model, activity=IDLE)

    def caption_bytes(
        self,
        data: bytes,
        *,
        name: str,
        prompt: str | None,
        max_new_tokens: int | None,
        timeout: float,
        path: Path | None = None,
        sidecar: str | None = None,
    ) -> CaptionReply:
        # The server waits for the model (``wait_ready``) before it asks, and serves the
        # ``ControlApi`` from before the model is ready: one that asks here waited in vain.
        raise _still_loading()

    def caption_url(self, url: str, *, prompt: str | None, max_new_tokens: int | None, timeout: float) -> CaptionReply:
        raise _still_loading()

    def stale(self, directory: Path | None) -> dict[str, list[dict[str, Any]]]:
        raise _still_loading()

    def recaption_stale(self, directory: Path | None, force: bool) -> tuple[int, int]:
        raise _still_loading()

    def pause(self) -> None:
        """Nothing runs yet: the scheduler starts paused (a pause at boot holds the backlog)."""
        self.lifecycle.pause_asked = True

    def resume(self) -> None:
        self.lifecycle.pause_asked = False


class ControlApi(_JournalApi):
    """Serves the running daemon: captions through the scheduler, status from every part."""

    def __init__(
        self,
        settings: Settings,
        lifecycle: Lifecycle,
        store: Journal,
        intake: Intake,
        reconciler: Reconciler,
        metrics: DaemonMetrics,
        *,
        captioner: Captioner,
        scheduler: Scheduler,
        writer: SidecarWriter,
        watcher: Watcher,
    ) -> None:
        super().__init__(
            settings, lifecycle, store, intake, reconciler, metrics, ClientOutputs(store, writer.merge_manifest)
        )
        self.captioner = captioner
        self.scheduler = scheduler
        self.writer = writer
        self.watcher = watcher

    def current_state(self) -> str:
        """``status``'s state: "loading", "ready", "paused" (the watched directories wait; socket
        requests are captioned), "waiting" (every remote endpoint is down) or "stopping"."""
        state: str = self.lifecycle.phase
        if state == "ready" and self.scheduler.paused:
            state = "paused"
        if state == "ready" and self.captioner.waiting:
            state = "waiting"  # why is in model.waiting
        return state

    def health(self) -> dict[str, Any]:
        reason: str | None = None
        if (waiting := self.captioner.waiting) is not None:
            reason = waiting  # "all endpoints are down: URL: why; ..."
        elif self.scheduler.broken is not None:
            reason = f"the model broke, a restart is due: {self.scheduler.broken}"
        return self._health(self.current_state(), reason)

    def status(self) -> dict[str, Any]:
        scheduler, watcher = self.scheduler, self.watcher
        activity = Activity(
            lanes=scheduler.lanes(),
            images_per_second=scheduler.throughput.rate(),
            captions_total=scheduler.throughput.total,
            batches_total=scheduler.batches,
            backlog_rate=scheduler.backlog_rate.recent(),
            recent_failures=list(scheduler.recent_failures),
            captions_by_source=dict(self.writer.by_source),
            watcher_pending=watcher.pending(),
            unresponsive_roots=watcher.unresponsive_roots(),
        )
        parts = (self.settings, self.lifecycle, self.store, self.intake, self.reconciler)
        model = model_section(self.settings, self.lifecycle, self.captioner, scheduler.max_batch)
        return status_document(*parts, state=self.current_state(), model=model, activity=activity)

    def caption_bytes(
        self,
        data: bytes,
        *,
        name: str,
        prompt: str | None,
        max_new_tokens: int | None,
        timeout: float,
        path: Path | None = None,
        sidecar: str | None = None,
    ) -> CaptionReply:
        started = time.monotonic()
        if not self.wait_ready(timeout):
            raise _still_loading()
        # ``path`` is where the client read ``data``: a key for the watch root's configuration, never
        # opened or read here (the daemon's user may not be allowed to). A file under a root gets what
        # the watcher gives it: its prompt unless the request names one, its form (``caption_form``).
        if (waiting := self.captioner.waiting) is not None:
            # Every remote endpoint is down: say so now rather than after the caption timeout.
            raise PhicapError(f"no caption can be made now: {waiting}", code=REMOTE_UNAVAILABLE, retryable=True)
        root = owning_root(path, self.settings.watch) if path is not None else None
        asked = prompt
        if root is not None and not prompt:
            prompt = self.settings.prompt_for(root)
        future = self.scheduler.submit(data, name=name, prompt=prompt, max_new_tokens=max_new_tokens)
        left = max(0.0, timeout - (time.monotonic() - started))
        try:
            caption = future.result(timeout=left)
        except FutureTimeout:
            future.cancel()
            message = f"{name}: no caption within {timeout:.0f} s"
            raise PhicapError(message, code=CAPTION_TIMEOUT, retryable=True) from None
        text = root_form(caption.text, root) if root is not None else caption.text
        if root is not None and path is not None and sidecar is not None:
            self.outputs.claim_sidecar(self.settings, journal_path(path, root), root, sidecar)
        identity = self.captioner.identity
        model, revision = model_and_revision(caption.model or identity)
        provenance: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "backend": caption.backend or self.settings.model.backend,
            "prompt": prompt or self.settings.model.prompt,
            "generation": generation_settings(self.settings, max_new_tokens),
        }
        if root is not None:
            # What phicapctl reports back with the caption (``captioned``): keyed by the prompt and
            # limit this request used, so a ``--prompt`` caption is stale against the root's.
            provenance["settings_key"] = settings_key(
                self.settings, root, identity, prompt=asked, max_new_tokens=max_new_tokens
            )
        return CaptionReply(
            text,
            caption.new_tokens,
            identity,
            time.monotonic() - started,
            root=str(root.path) if root is not None else None,
            provenance=provenance,
        )

    def caption_url(self, url: str, *, prompt: str | None, max_new_tokens: int | None, timeout: float) -> CaptionReply:
        from phicapd.fetch import fetch_url

        started = time.monotonic()
        if not self.wait_ready(timeout):
            raise _still_loading()
        fetched = fetch_url(url, self.settings.fetch)
        left = max(1.0, timeout - (time.monotonic() - started))
        reply = self.caption_bytes(fetched.data, name=url, prompt=prompt, max_new_tokens=max_new_tokens, timeout=left)
        return CaptionReply(reply.text, reply.new_tokens, reply.model, time.monotonic() - started, url=fetched.url)

    def _stale_report(self, directory: Path | None) -> staleness.StaleReport:
        try:
            return staleness.find_stale(self.settings, self.store, self.captioner.identity, directory)
        except staleness.NotWatched as e:
            raise PhicapError(str(e), code=NOT_WATCHED) from None

    def stale(self, directory: Path | None) -> dict[str, list[dict[str, Any]]]:
        report = self._stale_report(directory)

        def entry(job: Job, root: WatchRoot) -> dict[str, Any]:
            return {"path": str(job.path), "root": str(root.path), "model": job.model, "prompt": job.prompt}

        return {"stale": [entry(*e) for e in report.stale], "edited": [entry(*e) for e in report.edited]}

    def recaption_stale(self, directory: Path | None, force: bool) -> tuple[int, int]:
        report = self._stale_report(directory)
        chosen = report.stale + report.edited if force else report.stale
        n = staleness.requeue(self.store, chosen, report.reform)
        self._work_queued()
        log.info("recaption", requeued=n, edited_kept=0 if force else len(report.edited), dir=str(directory or ""))
        return n, 0 if force else len(report.edited)

    def pause(self) -> None:
        self.scheduler.pause()

    def resume(self) -> None:
        self.lifecycle.pause_asked = False  # a pause asked while loading is over too
        self.scheduler.resume()

    def _work_queued(self) -> None:
        self.scheduler.notify_work()
