"""The daemon's lifecycle: config -> journal -> socket -> model -> watchers -> READY -> serve -> drain.

``Daemon`` wires the parts together and is also the ``ControlBackend`` the control socket
serves: it owns nothing but references and the daemon's state ("loading", "ready",
"stopping"). The socket comes up first so ``phicapctl status`` answers while the model loads.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from phicapd import __version__
from phicapd.caption_form import root_form
from phicapd.captioner import Captioner
from phicapd.config import Settings, WatchRoot
from phicapd.control.backend import CaptionReply
from phicapd.control.protocol import BAD_REQUEST, CAPTION_NOT_WRITTEN, CAPTION_TIMEOUT, IMAGE_GONE, NOT_WATCHED
from phicapd.errors import ConfigError, ModelUnavailable, PhicapError
from phicapd.log import get_logger
from phicapd.metrics import DaemonMetrics
from phicapd.pipeline import staleness
from phicapd.pipeline.decode import fingerprint_of
from phicapd.pipeline.decode_pool import DecodeWorkers
from phicapd.pipeline.formats import generation_settings, model_and_revision, settings_key
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.jobs import Job, JobStore, Success
from phicapd.pipeline.outputs import RootOutputs, sidecar_base
from phicapd.pipeline.paths import is_watched_dir, journal_path, list_images, owning_root
from phicapd.pipeline.progress import Backlog, progress_report
from phicapd.pipeline.scanner import Reconciler
from phicapd.pipeline.scheduler import INTERACTIVE_DECODERS, Scheduler
from phicapd.pipeline.sidecar import Claims, is_rule_base
from phicapd.pipeline.watcher import Watcher
from phicapd.stop_deadline import StopDeadline

log = get_logger(__name__)

CaptionerFactory = Callable[[Settings], Captioner]

DRAIN_GRACE_SECONDS = 30.0
#: How long the start timeout is extended while the model loads (a first download of ~8 GB on a
#: slow link); past it systemd's start timeout applies and a restart resumes the download.
LOAD_CEILING_SECONDS = 3600.0
EXTEND_EVERY_SECONDS = 20.0  # the keepalive's period; each message extends by three of them
#: First wait before loading again a model that is not available yet (doubles, up to 5 min).
LOAD_RETRY_SECONDS = 10.0
EX_SOFTWARE = 70  # sysexits(3): the model broke; systemd's Restart=on-failure restarts us
STALL_SECONDS = 300.0
#: What a daemon started without [[watch]] says: it runs (phicapctl captions), but a new user
#: expects it to watch something.
NO_ROOTS_HINT = (
    'add a [[watch]] table with path = "/absolute/dir" to the configuration file '
    '(or PHICAPD_WATCH=\'[{"path": "/absolute/dir"}]\'), then `systemctl reload phicapd` or start '
    "phicapd run again; phicapctl caption-file and caption-dir work meanwhile"
)


def load_model_captioner(settings: Settings) -> Captioner:
    """The configured backend. Each is imported only when chosen: a remote-only daemon never
    imports torch or transformers."""
    if settings.model.backend == "openai":
        from phicapd.remote.captioner import load_remote_captioner

        return load_remote_captioner(settings)

    from phicapd.log import adopt_transformers_logging
    from phicapd.model.captioner import load_captioner

    adopt_transformers_logging()
    return load_captioner(settings.model)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        captioner_factory: CaptionerFactory = load_model_captioner,
        settings_loader: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._settings_loader = settings_loader  # re-reads the configuration on SIGHUP
        self._reload = threading.Event()
        self._wake = threading.Event()
        self._captioner_factory = captioner_factory
        self.state = "starting"
        self.started_at = time.time()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._loading = False  # the main thread is loading the model: a signal interrupts it
        self._deadline = StopDeadline()  # armed by SIGTERM: the process ends in time, stuck or not
        self._keepalive: _ExtendTimeout | None = None
        self.captioner: Captioner | None = None
        self.scheduler: Scheduler | None = None
        # The last reload that was refused, {"at": epoch seconds, "reason"}, until one succeeds:
        # ``phicapctl status`` shows it, not only the log.
        self.reload_refused: dict[str, Any] | None = None
        self.decoders: DecodeWorkers | None = None
        # Why the model is not ready yet, for ``phicapctl status``; None once it is loaded.
        self.loading: str | None = f"loading the model from {model_source(settings)}"
        self.store = JobStore(
            settings.state.dir / "journal.sqlite3",
            max_attempts=settings.scheduler.max_attempts,
            backoff_seconds=settings.scheduler.retry_backoff_seconds,
        )
        self.reconciler = Reconciler(settings, self.store, lambda: getattr(self.captioner, "identity", None))
        self.intake = Intake(self.reconciler, self._work_queued)
        self.watcher: Watcher | None = None
        self.server: Any = None
        self.prometheus = DaemonMetrics(self.status, self.is_ready)

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_: object) -> None:
        """Re-read the configuration (SIGHUP): done by the main loop, once the model is ready."""
        self._reload.set()
        self._wake.set()

    def _on_signal(self, *_: object) -> None:
        self._stop.set()
        self._wake.set()
        self._deadline.arm()
        if self._keepalive is not None:
            # During a stop EXTEND_TIMEOUT_USEC would extend the stop timeout: a download that
            # finishes its running files first must not hold systemctl stop beyond TimeoutStopSec.
            self._keepalive.stop()
        if self._loading:
            # Nothing is in flight while the model loads: stop now rather than after a download
            # or a compile of minutes (the stop timeout would kill us first).
            self._loading = False
            raise _StopWhileLoading

    def _on_hangup(self, *args: object) -> None:
        """SIGHUP of a foreground run: its terminal closed. Stop as for SIGTERM (drained, exit 0),
        so no GPU stays busy for a session that is gone."""
        log.warning("SIGHUP: stopping (the terminal closed?); `phicapd run --reload-on-hup` reloads instead")
        self._on_signal(*args)

    def run(
        self,
        *,
        notifier: Any = None,
        listen_socket: Any = None,
        install_signals: bool = True,
        reload_on_hup: bool = True,
    ) -> int:
        """Serve until stopped; returns the exit code. ``reload_on_hup``: SIGHUP re-reads the
        configuration (systemctl reload), else it stops the daemon like SIGTERM."""
        from phicapd.control.server import ControlServer
        from phicapd.systemd import Notifier, WatchdogFeeder

        notifier = notifier or Notifier()
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self.request_reload if reload_on_hup else self._on_hangup)

        recovered = self.store.recover()
        if recovered:
            log.info("returned interrupted jobs to the queue", jobs=recovered)

        self.state = "loading"
        self.server = ControlServer(self.settings.control, self, listen_socket=listen_socket)
        self.server.start()
        if not self.settings.watch:
            log.warning("no watch roots: no directory is watched", hint=NO_ROOTS_HINT)

        notifier.status(f"loading model {model_source(self.settings)}")
        keepalive = self._keepalive = _ExtendTimeout(notifier)
        keepalive.start()
        try:
            try:
                self._loading = install_signals and not self._stop.is_set()
                self.captioner = self._load_captioner(notifier)
                warm_up = getattr(self.captioner, "warm_up", None)
                if warm_up is not None:
                    notifier.status("warming up the model")
                    warm_up()
            finally:
                self._loading = False  # from here on a signal only sets _stop
                keepalive.stop()
        except _StopWhileLoading:
            log.info("stopped while loading the model")
            self._shutdown(notifier)
            return 0
        except Exception as e:
            self._shutdown(notifier)
            if isinstance(e, PhicapError):
                raise
            log.exception("cannot load the model", source=model_source(self.settings))
            raise PhicapError(
                f"cannot load the model from {model_source(self.settings)}: {type(e).__name__}: {e}",
                code="model_load_failed",
            ) from e
        if self._stop.is_set():
            self._shutdown(notifier)
            return 0

        # Images are decoded in worker processes: a file that crashes a decoder costs a worker.
        workers = self.settings.scheduler.decode_workers
        self.decoders = DecodeWorkers(self.settings.imaging, workers, min(INTERACTIVE_DECODERS, workers))
        self.scheduler = Scheduler(
            self.settings,
            self.captioner,
            self.store,
            decode_file=self.decoders.decode_file,
            decode_bytes=self.decoders.decode_bytes,
            list_images=list_images,
            metrics=self.prometheus,
        )
        self.scheduler.start()
        self.intake.start()
        self.watcher = Watcher(
            self.settings.watch,
            self.settings.watcher,
            on_ready=lambda path, root: self.intake.file_ready(path, root),
            on_rescan=lambda root, directory, reason: self.intake.rescan(root, directory, reason),
            on_gone=self._file_gone,
            on_moved=self.intake.moved,
        )
        self.watcher.start()
        for root in self.settings.watch:
            self.intake.rescan(root, root.path, "startup")
        self._restale_auto()
        self.scheduler.notify_work()

        self.state = "ready"
        self._ready.set()
        notifier.ready()
        notifier.status(self.status_line())
        log.info("ready", model=self.captioner.identity, roots=[str(r.path) for r in self.settings.watch])
        feeder = WatchdogFeeder(notifier, health_check=self.healthy, status_text=self.status_line)
        feeder.start()
        rc = 0
        try:
            while not self._stop.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.reload(notifier)
                if self.scheduler.broken is not None:
                    # A restart gets a fresh CUDA context; the images it was on are counted as
                    # interrupted, so one that breaks the GPU every time is parked in the end.
                    log.error("exiting for a restart", reason=str(self.scheduler.broken))
                    rc = EX_SOFTWARE
                    break
        finally:
            feeder.stop()
            self._shutdown(notifier)
        return rc

    def reload(self, notifier: Any = None) -> bool:
        """Apply the configuration file again without unloading the model (``phicapd.reload``
        says what can change live). A file that does not load changes nothing. True if applied."""
        from phicapd.reload import live_settings, restart_only_changes
        from phicapd.systemd import Notifier, check_roots_writable

        notifier = notifier or Notifier()
        if self._settings_loader is None:
            log.warning("reload asked, but this daemon was not started from a configuration file")
            return False
        notifier.reloading()
        try:
            try:
                new = self._settings_loader()
                # A root added now must pass the start-up check too (exists, writable).
                known = {r.path for r in self.settings.watch}
                check_roots_writable(new.model_copy(update={"watch": [r for r in new.watch if r.path not in known]}))
            except (ConfigError, OSError) as e:
                log.error("reload refused: the configuration is invalid; keeping the running one", reason=str(e))
                self.reload_refused = {"at": time.time(), "reason": str(e)}
                return False
            self.reload_refused = None
            old = self.settings
            needs_restart = restart_only_changes(old, new)
            if needs_restart:
                log.warning("reload: these settings need a restart and were not applied", keys=needs_restart)
            settings = live_settings(old, new)
            self._apply(settings)
            log.info(
                "configuration reloaded",
                roots=[str(r.path) for r in settings.watch],
                needs_restart=needs_restart,
            )
            return True
        finally:
            notifier.ready()
            notifier.status(self.status_line())

    def _apply(self, settings: Settings) -> None:
        """Hand the new live settings to every part that holds them."""
        self.settings = settings
        self.reconciler.settings = settings
        if self.scheduler is not None:
            self.scheduler.set_settings(settings)
        logging.getLogger().setLevel(settings.log.level.upper())
        self.intake.set_roots(settings.watch)
        if self.watcher is not None:
            self.watcher.set_roots(settings.watch)
        self._restale_auto()

    def _load_captioner(self, notifier: Any) -> Captioner:
        """Load the model, waiting out a hub that is down or a GPU driver that is not up yet
        inside the process (systemd's start limit would give up after a few restarts)."""
        deadline = time.monotonic() + LOAD_CEILING_SECONDS
        delay = LOAD_RETRY_SECONDS
        while True:
            try:
                return self._captioner_factory(self.settings)
            except ModelUnavailable as e:
                if e.code == "gpu_unavailable" or time.monotonic() + delay > deadline:
                    raise  # torch never sees a driver that comes up later: a restart will
                log.warning("the model is not available yet; trying again", error=str(e), seconds=delay)
                self.loading = f"waiting for the model, trying again every {delay:.0f} s or more: {e}"
                notifier.status(f"waiting for the model, again in {delay:.0f} s: {e}")
                if self._stop.wait(delay):
                    raise _StopWhileLoading from None
                delay = min(delay * 2, 300.0)

    def _shutdown(self, notifier: Any) -> None:
        self.state = "stopping"
        notifier.stopping()
        log.info("stopping")
        if self.watcher is not None:
            self.watcher.stop()
        self.intake.stop()
        if self.scheduler is not None:
            self.scheduler.stop(DRAIN_GRACE_SECONDS)
        if self.decoders is not None:
            self.decoders.close()
        if self.server is not None:
            self.server.stop()
        if self.captioner is not None:
            try:
                self.captioner.close()
            except Exception:  # a GPU in a sticky error state may fail to free; we exit anyway
                log.exception("closing the model failed")
        self.store.close()
        self._deadline.stopped()
        log.info("stopped")

    def _file_gone(self, path: Path, root: WatchRoot) -> None:
        """A watched file was deleted or moved away: its directory's manifest drops it."""
        current = next((r for r in self.settings.watch if r.path == root.path), root)
        if self.scheduler is not None and "jsonl" in self.settings.formats_for(current):
            self.scheduler.writer.refresh_manifest(path.parent)

    def _work_queued(self) -> None:
        if self.scheduler is not None:
            self.scheduler.notify_work()

    def healthy(self) -> bool:
        """The watchdog's question: are the GPU worker and the watcher still making progress?"""
        if self.scheduler is None or not self.scheduler.healthy(STALL_SECONDS):
            return False
        return self.watcher is None or time.monotonic() - self.watcher.last_progress < STALL_SECONDS

    def _waiting(self) -> str | None:
        """Why the backend cannot take work now (every remote endpoint is down), or None."""
        waiting = getattr(self.captioner, "waiting", None)
        return waiting if isinstance(waiting, str) else None

    def status_line(self) -> str:
        if self.scheduler is None:
            return self.state
        counts = self.store.counts()
        state = "waiting: every remote endpoint is down" if self.state == "ready" and self._waiting() else self.state
        return (
            f"{state}: {counts['pending'] + counts['running']} queued, {counts['done']} done, "
            f"{counts['failed']} failed, {self.scheduler.throughput.rate():.2f} img/s"
        )

    # -- ControlBackend ------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._stop.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def current_state(self) -> str:
        """``status``'s state: "loading", "ready", "paused" (the watched directories wait; socket
        requests are captioned), "waiting" (every remote endpoint is down) or "stopping"."""
        state = self.state
        if state == "ready" and self.scheduler is not None and self.scheduler.paused:
            state = "paused"
        if state == "ready" and self._waiting():
            state = "waiting"  # why is in model.waiting
        return state

    def health(self) -> dict[str, Any]:
        state = self.current_state()
        ready = self.is_ready()
        reason: str | None = None
        if not ready:
            reason = self.loading if state == "loading" and self.loading else f"the daemon is {state}"
        elif (waiting := self._waiting()) is not None:
            reason = waiting  # "all endpoints are down: URL: why; ..."
        elif self.scheduler is not None and self.scheduler.broken is not None:
            reason = f"the model broke, a restart is due: {self.scheduler.broken}"
        return {"ready": ready, "captioning": ready and reason is None, "state": state, "reason": reason}

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
        if not self.wait_ready(timeout) or self.scheduler is None:
            raise PhicapError("the model is still loading", code="not_ready", retryable=True)
        # ``path`` is where the client read ``data``: a key for the watch root's configuration, never
        # opened or read here (the daemon's user may not be allowed to). A file under a root gets what
        # the watcher gives it: its prompt unless the request names one, its form (``caption_form``).
        if (waiting := self._waiting()) is not None:
            # Every remote endpoint is down: say so now rather than after the caption timeout.
            raise PhicapError(f"no caption can be made now: {waiting}", code="remote_unavailable", retryable=True)
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
        assert self.captioner is not None
        text = root_form(caption.text, root) if root is not None else caption.text
        if root is not None and path is not None and sidecar is not None:
            self._claim_client_sidecar(journal_path(path, root), root, sidecar)
        model, revision = model_and_revision(caption.model or self.captioner.identity)
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
            identity = self.captioner.identity
            provenance["settings_key"] = settings_key(
                self.settings, root, identity, prompt=asked, max_new_tokens=max_new_tokens
            )
        return CaptionReply(
            text,
            caption.new_tokens,
            self.captioner.identity,
            time.monotonic() - started,
            root=str(root.path) if root is not None else None,
            provenance=provenance,
        )

    def caption_url(self, url: str, *, prompt: str | None, max_new_tokens: int | None, timeout: float) -> CaptionReply:
        from phicapd.fetch import fetch_url

        started = time.monotonic()
        if not self.wait_ready(timeout):
            raise PhicapError("the model is still loading", code="not_ready", retryable=True)
        fetched = fetch_url(url, self.settings.fetch)
        left = max(1.0, timeout - (time.monotonic() - started))
        reply = self.caption_bytes(fetched.data, name=url, prompt=prompt, max_new_tokens=max_new_tokens, timeout=left)
        return CaptionReply(reply.text, reply.new_tokens, reply.model, time.monotonic() - started, url=fetched.url)

    def sidecar_policy(self, path: Path) -> dict[str, Any]:
        # What phicapctl needs to name and keep the sidecar of ``path`` exactly as the watcher
        # would: the owning root's include/ignore patterns feed the naming rule (``list_images``)
        # and its ``existing`` setting overrides the global one. ``path`` is never opened.
        policy: dict[str, Any] = {
            "extension": self.settings.sidecar.extension,
            "existing": self.settings.sidecar.existing,
            "root": None,
            "claims": {},
            "formats": list(self.settings.sidecar.formats),
            "xmp_naming": self.settings.sidecar.xmp_naming,
        }
        root = owning_root(path, self.settings.watch)
        if root is None:
            return policy
        policy["existing"] = self.settings.existing_policy(root)
        policy["formats"] = list(self.settings.formats_for(root))
        policy["xmp_naming"] = self.settings.xmp_naming_for(root)
        policy["claims"] = self.store.claims_in(journal_path(path, root).parent)
        # The client's directory is resolved; a symlinked root matches it by its resolved form,
        # and list_images relates the directory to the root, so report the form that matched.
        base = root.path
        if not is_watched_dir(path.parent, root):
            base = Path(os.path.realpath(root.path))
        policy["root"] = {
            "path": str(base),
            "recursive": root.recursive,
            "include": list(root.include),
            "ignore": list(root.ignore),
        }
        return policy

    def _claim_client_sidecar(self, image: Path, root: WatchRoot, sidecar: str) -> None:
        """phicapctl writes ``sidecar`` for ``image``: keep that name the image's, as the writer
        does for its own."""
        extension = RootOutputs.of(self.settings, root).named_extension
        if extension is None or not sidecar.endswith(extension):
            log.warning("sidecar name not recorded", path=str(image), sidecar=sidecar)
            return
        base = self._client_claim(image, sidecar[: -len(extension)])
        if base is not None:
            self.store.claim_sidecars([(image, base)])

    def _client_claim(self, image: Path, base: str) -> str | None:
        """``base``, the sidecar base phicapctl named ``image``'s files with, if it is to be claimed
        for the image; None if the image holds a claim already, the name is not one the rule can
        give the image, or it already belongs to another image that is still there (then
        phicapctl named it without a claim that appeared meanwhile; the journal's claim stands)."""
        if not is_rule_base(image.name, base):
            log.warning("sidecar name not recorded", path=str(image), base=base)
            return None
        claims = Claims(self.store.claims_near(image), image.parent)
        if image.name in claims.by_image or claims.holder(base, ()) not in (None, image.name):
            return None
        return base

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
        # phicapctl wrote the outputs itself, with its user's permissions; the daemon records
        # them as the writer records its own, so the scans do not caption the image again and
        # ``phicapctl stale`` judges it like the daemon's. It writes nothing for the client but
        # the root's manifest, which is its own (the writer thread's) to keep.
        root = owning_root(path, self.settings.watch)
        if root is None:
            raise PhicapError(f"{path} is under no watch root", code=NOT_WATCHED)
        image = journal_path(path, root)
        # Stat here, not the client's word: after an embed the image is a new file (inode), and
        # the journal must know that version as captioned, or ``overwrite`` would redo it.
        fingerprint = fingerprint_of(image)
        if fingerprint is None:
            raise PhicapError(f"{path}: no such image to record", code=IMAGE_GONE)
        outputs = RootOutputs.of(self.settings, root)
        extension = outputs.named_extension
        base, claim = sidecar_base(image), None
        if extension is not None:  # per-image files, named by the rule (and phicapctl's claims)
            if sidecar is None or not sidecar.endswith(extension) or len(sidecar) == len(extension):
                raise PhicapError(f"sidecar must name the image's {extension} file, got {sidecar!r}", code=BAD_REQUEST)
            base = sidecar[: -len(extension)]
            claim = self._client_claim(image, base)
        # The caption goes into the root's manifest, which the daemon writes: only one that an
        # output of the image already holds (whoever reports it could write there, or the daemon
        # did) is taken, not any text a client of the socket sends. A root that writes only the
        # manifest has no such output: there the socket's group is trusted, as for captions.
        if outputs.formats != ("jsonl",) and not outputs.holds(image, base, caption):
            raise PhicapError(f"{path}: none of its outputs holds the reported caption", code=CAPTION_NOT_WRITTEN)
        record = Success(
            0,
            sha256,
            model,
            prompt,
            str(outputs.primary(image, base)),
            fingerprint,
            backend=backend,
            caption=caption,
            settings_key=settings_key,
            formats=outputs.formats,
        )
        recorded = self.store.record_captioned(image, root.path, record, claim)
        if recorded and self.scheduler is not None and "jsonl" in outputs.formats:
            self.scheduler.writer.merge_manifest(image.parent, {image.name: caption})
        return recorded

    def status(self) -> dict[str, Any]:
        sched = self.scheduler
        state = self.current_state()
        describe = getattr(self.captioner, "describe", None)
        details = describe() if describe is not None else {}
        model: dict[str, Any] = {"source": model_source(self.settings), "loaded": self.captioner is not None}
        if self.captioner is None and self.loading is not None:
            model["loading"] = self.loading
        if self.captioner is not None:
            model["identity"] = self.captioner.identity
            model["max_batch"] = sched.max_batch if sched else self.captioner.max_batch
        counts = self.store.counts()
        return {
            "state": state,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "model": {**model, **{k: v for k, v in details.items() if k != "gpu"}},
            "gpu": details.get("gpu"),
            "lanes": {**(sched.lanes() if sched else {}), **self.intake.backlog()},
            "journal": counts,
            "throughput": {
                "images_per_second_1m": round(sched.throughput.rate(), 3) if sched else 0.0,
                "captions_total": sched.throughput.total if sched else 0,
                "batches_total": sched.batches if sched else 0,
            },
            "progress": self._progress(counts, state),
            "recent_failures": list(sched.recent_failures) if sched else [],
            # Which backend, endpoint and server-reported model made the captions since start.
            "captions_by_source": [
                {"backend": b, "endpoint": e, "model": m, "captions": n}
                for (b, e, m), n in sorted((sched.writer.by_source if sched else {}).items(), key=lambda kv: str(kv[0]))
            ],
            # The running configuration, and a reload refused since it was applied.
            "config": {"reload_refused": self.reload_refused},
            "watch": [str(r.path) for r in self.settings.watch],
            "max_body_bytes": self.settings.control.max_body_bytes,  # phicapctl refuses larger files unread
            "watcher_pending": self.watcher.pending() if self.watcher else 0,
            "unresponsive_roots": self.watcher.unresponsive_roots() if self.watcher else [],
            # Image files the last full scan of a root passed over: no installed decoder reads them.
            "unreadable": self.reconciler.unreadable.report([r.path for r in self.settings.watch]),
            # A root whose last scan failed is not being caught up: shown until a scan succeeds.
            "scan_failed": self.intake.scan_failures(),
            "sidecar": {
                "extension": self.settings.sidecar.extension,
                "existing": self.settings.sidecar.existing,
                "formats": list(self.settings.sidecar.formats),
                "xmp_naming": self.settings.sidecar.xmp_naming,
                "restale": self.settings.sidecar.restale,
            },
            # What each root writes and keeps, with its own settings applied.
            "outputs": [
                {
                    "root": str(r.path),
                    "formats": list(self.settings.formats_for(r)),
                    "existing": self.settings.existing_policy(r),
                    "restale": self.settings.restale_for(r),
                }
                for r in self.settings.watch
            ],
        }

    def _progress(self, counts: dict[str, int], state: str) -> dict[str, Any]:
        """How much is left and when it will be done: what a person asks first (``pipeline.progress``)."""
        retrying, next_retry_in = self.store.backing_off()
        retrying = min(retrying, counts["pending"])  # two reads: a job may have turned due between them
        backlog = Backlog(counts["pending"] - retrying + counts["running"], retrying, next_retry_in)
        rate, busy = self.scheduler.backlog_rate.recent() if self.scheduler is not None else (0.0, 0.0)
        # Parked and waiting to be retried, as ``phicapctl failures`` lists them.
        by_code: dict[str, int] = {}
        for _, code, jobs in self.store.failure_counts():
            by_code[code] = by_code.get(code, 0) + jobs
        return {
            **progress_report(backlog, rate, busy, state),
            "failures_by_code": dict(sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0]))),
        }

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

    def _stale_report(self, directory: Path | None) -> staleness.StaleReport:
        if self.captioner is None:
            raise PhicapError("the model is still loading", code="not_ready", retryable=True)
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

    def _restale_auto(self) -> None:
        """``restale = "auto"`` roots: redo their stale captions (at start, after a reload)."""
        if self.captioner is None:
            return
        for root in self.settings.watch:
            if self.settings.restale_for(root) == "auto":
                report = staleness.find_stale(self.settings, self.store, self.captioner.identity, root.path)
                if report.stale:
                    n = staleness.requeue(self.store, report.stale, report.reform)
                    log.info("recaption", root=str(root.path), requeued=n, edited_kept=len(report.edited), auto=True)
        self._work_queued()

    def pause(self) -> None:
        if self.scheduler is not None:
            self.scheduler.pause()

    def resume(self) -> None:
        if self.scheduler is not None:
            self.scheduler.resume()

    def rescan(self) -> None:
        for root in self.settings.watch:
            self.intake.rescan(root, root.path, "request")

    def metrics(self) -> str:
        return self.prometheus.render()


def model_source(settings: Settings) -> str:
    """Where the captions come from, for messages: the native model's source or the endpoints."""
    if settings.model.backend == "openai":
        return f"{settings.remote.model} at {', '.join(settings.remote.endpoints)}"
    return settings.model.source


class _StopWhileLoading(BaseException):
    """Raised by the signal handler into the model load (no ``except Exception`` there swallows it)."""


class _ExtendTimeout:
    """While the model loads (minutes on a cold cache), keep extending systemd's start timeout,
    for at most ``ceiling`` seconds: a load that hangs must still time out."""

    def __init__(self, notifier: Any, every: float | None = None, ceiling: float = LOAD_CEILING_SECONDS) -> None:
        self._notifier = notifier
        self._every = every or EXTEND_EVERY_SECONDS
        self._ceiling = ceiling
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="phicapd-extend", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _loop(self) -> None:
        deadline = time.monotonic() + self._ceiling
        while not self._done.is_set():
            if time.monotonic() >= deadline:
                log.warning("still loading the model; no longer extending the start timeout", seconds=self._ceiling)
                return
            self._notifier.extend_timeout(self._every * 3)
            self._done.wait(self._every)


def run(
    settings: Settings,
    captioner_factory: CaptionerFactory = load_model_captioner,
    settings_loader: Callable[[], Settings] | None = None,
    *,
    reload_on_hup: bool | None = None,
) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code.

    SIGHUP reloads the configuration through ``settings_loader`` when systemd started us (it is
    ``systemctl reload``) or ``reload_on_hup`` says so; otherwise it is a closed terminal and
    stops the daemon, like SIGTERM."""
    from phicapd.preflight import check_startup
    from phicapd.systemd import listen_fds, started_by_systemd

    sockets = listen_fds()
    check_startup(settings, socket_inherited=bool(sockets))
    daemon = Daemon(settings, captioner_factory, settings_loader)
    reload = started_by_systemd() if reload_on_hup is None else reload_on_hup
    return daemon.run(listen_socket=sockets[0] if sockets else None, reload_on_hup=reload)
