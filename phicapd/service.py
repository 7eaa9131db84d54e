"""The daemon's lifecycle: config -> journal -> socket -> model -> watchers -> READY -> serve -> drain.

``Daemon`` starts the parts in order, serves until a signal, and stops them in reverse; it
owns them and the lifecycle's state ("starting", "loading", "ready", "stopping"). What the
control socket answers is the control API's (``phicapd.control_api``): the socket comes up
first, with a stand-in that answers from the journal while the model loads (``phicapctl
status`` works then), and serves the whole API once the pipeline runs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from phicapd.captioner import Captioner
from phicapd.client_outputs import ClientOutputs, no_manifest_writer
from phicapd.config import Settings
from phicapd.control_api import ControlApi, LoadingApi
from phicapd.errors import ConfigError, ModelUnavailable, PhicapError
from phicapd.lifecycle import Lifecycle
from phicapd.log import get_logger
from phicapd.metrics import DaemonMetrics
from phicapd.pipeline import staleness
from phicapd.pipeline.decode_pool import DecodeWorkers
from phicapd.pipeline.intake import Intake
from phicapd.pipeline.journal import Journal
from phicapd.pipeline.paths import list_images
from phicapd.pipeline.reconciler import Reconciler
from phicapd.pipeline.scheduler import INTERACTIVE_DECODERS, Scheduler
from phicapd.pipeline.watcher import Watcher
from phicapd.status_report import model_source
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
    """Start -> serve -> stop: builds the parts in order, serves until a signal (or a broken
    model) and stops them in reverse. It owns the parts; the control socket serves ``api``."""

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
        self.lifecycle = Lifecycle(loading=f"loading the model from {model_source(settings)}")
        self._loading = False  # the main thread is loading the model: a signal interrupts it
        self._deadline = StopDeadline()  # armed by SIGTERM: the process ends in time, stuck or not
        self._keepalive: _ExtendTimeout | None = None
        self.store = Journal(
            settings.state.dir / "journal.sqlite3",
            max_attempts=settings.scheduler.max_attempts,
            backoff_seconds=settings.scheduler.retry_backoff_seconds,
        )
        # The copies' settings key needs the model's identity, known once it is loaded.
        self.reconciler = Reconciler(settings, self.store, lambda: self.captioner.identity if self.captioner else None)
        self.intake = Intake(self.reconciler, self._work_queued)
        self.prometheus = DaemonMetrics(lambda: self.api.status(), self.lifecycle.is_ready)
        self.loading_api = LoadingApi(
            settings,
            self.lifecycle,
            self.store,
            self.intake,
            self.reconciler,
            self.prometheus,
            ClientOutputs(self.store, no_manifest_writer),
        )
        #: What the control socket serves: the stand-in until the pipeline runs.
        self.api: LoadingApi | ControlApi = self.loading_api
        # Built in order by ``run``; each stays None until it is (``_shutdown`` stops what was).
        self.server: Any = None
        self.captioner: Captioner | None = None
        self.decoders: DecodeWorkers | None = None
        self.scheduler: Scheduler | None = None
        self.watcher: Watcher | None = None

    # -- signals -------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self.lifecycle.stop.set()
        self._wake.set()

    def request_reload(self, *_: object) -> None:
        """Re-read the configuration (SIGHUP): done by the main loop, once the model is ready."""
        self._reload.set()
        self._wake.set()

    def _on_signal(self, *_: object) -> None:
        self.request_stop()
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

    # -- start -> serve -> stop ----------------------------------------------------------------

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
        from phicapd.systemd import Notifier

        notifier = notifier or Notifier()
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self.request_reload if reload_on_hup else self._on_hangup)

        recovered = self.store.recover()
        if recovered:
            log.info("returned interrupted jobs to the queue", jobs=recovered)

        self.lifecycle.phase = "loading"
        self.server = ControlServer(self.settings.control, self.api, listen_socket=listen_socket)
        self.server.start()
        if not self.settings.watch:
            log.warning("no watch roots: no directory is watched", hint=NO_ROOTS_HINT)

        try:
            captioner = self._load(notifier, install_signals)
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
        if self.lifecycle.stop.is_set():
            self._shutdown(notifier)
            return 0

        scheduler = self._start_pipeline(captioner)
        self.lifecycle.phase = "ready"
        self.lifecycle.ready.set()
        notifier.ready()
        notifier.status(self.status_line())
        log.info("ready", model=captioner.identity, roots=[str(r.path) for r in self.settings.watch])
        try:
            return self._serve(notifier, scheduler)
        finally:
            self._shutdown(notifier)

    def _load(self, notifier: Any, interruptible: bool) -> Captioner:
        """Load and warm up the model, keeping systemd's start timeout extended meanwhile."""
        notifier.status(f"loading model {model_source(self.settings)}")
        keepalive = self._keepalive = _ExtendTimeout(notifier)
        keepalive.start()
        try:
            self._loading = interruptible and not self.lifecycle.stop.is_set()
            captioner = self.captioner = self._load_captioner(notifier)  # closed by _shutdown from here on
            self.loading_api.captioner = captioner  # status shows it while it warms up
            notifier.status("warming up the model")
            captioner.warm_up()
            return captioner
        finally:
            self._loading = False  # from here on a signal only sets the stop event
            keepalive.stop()

    def _start_pipeline(self, captioner: Captioner) -> Scheduler:
        """Decoders, scheduler, intake, watcher, in that order; then the socket serves the whole API."""
        settings = self.settings
        # Images are decoded in worker processes: a file that crashes a decoder costs a worker.
        workers = settings.scheduler.decode_workers
        self.decoders = DecodeWorkers(settings.imaging, workers, min(INTERACTIVE_DECODERS, workers))
        scheduler = self.scheduler = Scheduler(
            settings,
            captioner,
            self.store,
            decode_file=self.decoders.decode_file,
            decode_bytes=self.decoders.decode_bytes,
            list_images=list_images,
            metrics=self.prometheus,
        )
        if self.lifecycle.pause_asked:
            scheduler.pause()
        scheduler.start()
        self.intake.start()
        writer = scheduler.writer  # the manifests' keeper: the watcher and the API hand it work
        watcher = self.watcher = Watcher(
            settings.watch,
            settings.watcher,
            on_ready=lambda path, root: self.intake.file_ready(path, root),
            on_rescan=lambda root, directory, reason: self.intake.rescan(root, directory, reason),
            on_gone=writer.file_gone,
            on_moved=self.intake.moved,
        )
        watcher.start()
        for root in settings.watch:
            self.intake.rescan(root, root.path, "startup")
        self._restale_auto()
        self.api = ControlApi(
            settings,
            self.lifecycle,
            self.store,
            self.intake,
            self.reconciler,
            self.prometheus,
            captioner=captioner,
            scheduler=scheduler,
            writer=writer,
            watcher=watcher,
        )
        # Before READY: a request that waited for the model meets the whole API.
        self.server.serve(self.api)
        if self.lifecycle.pause_asked:  # asked of the stand-in after the start above
            scheduler.pause()
        return scheduler

    def _serve(self, notifier: Any, scheduler: Scheduler) -> int:
        """The main loop: reloads, and the exit for a broken model. Returns the exit code."""
        from phicapd.systemd import WatchdogFeeder

        feeder = WatchdogFeeder(notifier, health_check=self.healthy, status_text=self.status_line)
        feeder.start()
        try:
            while not self.lifecycle.stop.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                if self._reload.is_set() and not self.lifecycle.stop.is_set():
                    self._reload.clear()
                    self.reload(notifier)
                if scheduler.broken is not None:
                    # A restart gets a fresh CUDA context; the images it was on are counted as
                    # interrupted, so one that breaks the GPU every time is parked in the end.
                    log.error("exiting for a restart", reason=str(scheduler.broken))
                    return EX_SOFTWARE
            return 0
        finally:
            feeder.stop()

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
                self.lifecycle.reload_refused = {"at": time.time(), "reason": str(e)}
                return False
            self.lifecycle.reload_refused = None
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
        self.api.settings = settings
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
                self.lifecycle.loading = f"waiting for the model, trying again every {delay:.0f} s or more: {e}"
                notifier.status(f"waiting for the model, again in {delay:.0f} s: {e}")
                if self.lifecycle.stop.wait(delay):
                    raise _StopWhileLoading from None
                delay = min(delay * 2, 300.0)

    def _shutdown(self, notifier: Any) -> None:
        self.lifecycle.phase = "stopping"
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

    # -- what the pipeline and systemd ask -----------------------------------------------------

    def _work_queued(self) -> None:
        if self.scheduler is not None:
            self.scheduler.notify_work()

    def _restale_auto(self) -> None:
        """``restale = "auto"`` roots: redo their stale captions (at start, after a reload)."""
        if self.captioner is not None:
            staleness.restale_auto(self.settings, self.store, self.captioner.identity)
        self._work_queued()

    def is_ready(self) -> bool:
        return self.lifecycle.is_ready()

    def healthy(self) -> bool:
        """The watchdog's question: are the GPU worker and the watcher still making progress?"""
        if self.scheduler is None or not self.scheduler.healthy(STALL_SECONDS):
            return False
        return self.watcher is None or time.monotonic() - self.watcher.last_progress < STALL_SECONDS

    def status_line(self) -> str:
        """systemd's STATUS=: the state and the journal's counts in one line."""
        phase = self.lifecycle.phase
        if self.scheduler is None or self.captioner is None:
            return phase
        counts = self.store.counts()
        waiting = phase == "ready" and self.captioner.waiting
        state = "waiting: every remote endpoint is down" if waiting else phase
        return (
            f"{state}: {counts['pending'] + counts['running']} queued, {counts['done']} done, "
            f"{counts['failed']} failed, {self.scheduler.throughput.rate():.2f} img/s"
        )


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
