"""phicapctl: drive a running phicapd over its control socket.

Commands: caption-file, caption-dir, caption-url, status, health, failures, stale, recaption,
retry, pause, resume, rescan, metrics, version, orphans (files only: it works with the daemon
stopped). ``caption-file`` and ``caption-dir`` read images with the
caller's permissions, send the bytes and write the sidecars themselves. A file under a watched
root gets that root's prompt, prefix and suffix, as if the daemon had captioned it from there.

Socket: ``--socket`` > ``$PHICAPD_SOCKET`` > the ``[control] socket`` of the daemon's config
(``--config FILE``, else ``$PHICAPD_CONFIG``, else /etc/phicapd/phicapd.toml when this user can
read it) > /run/phicapd/phicapd.sock if its directory exists > the per-user socket
(``$XDG_RUNTIME_DIR/phicapd.sock``).

Exit codes: see ``EXIT_CODES`` below (also printed by ``phicapctl --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from pydantic import ValidationError

from phicapd import __version__
from phicapd.cli.helpformat import HelpFormatter
from phicapd.cli.orphans import cmd_orphans
from phicapd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    SYSTEM_SOCKET_PATH,
    socket_from_config,
    user_socket_path,
)
from phicapd.control import batch
from phicapd.control.batch import BatchCaptioner, Options, Outcome
from phicapd.control.client import (
    DEFAULT_CAPTION_TIMEOUT,
    DEFAULT_TIMEOUT,
    ControlClient,
    ControlClientError,
    DaemonUnreachable,
    RequestRejected,
)
from phicapd.errors import ConfigError
from phicapd.fsnames import display
from phicapd.outputs.atomic import write_sidecar

EX_USAGE = 64
EX_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away
SOCKET_ENV = "PHICAPD_SOCKET"

EXIT_CODES = """\
exit codes (sysexits):
  0    success (for batches: every file captioned or skipped as up to date)
  64   usage error (EX_USAGE)
  65   input rejected by the daemon, a 4xx answer: not an image, URL refused;
       retry: a PATH that is not a failed image (EX_DATAERR)
  66   an input file or directory, or the --config file, could not be read (EX_NOINPUT)
  69   daemon unreachable: no socket, nobody listening, no permission;
       health: no caption can be made now; caption-file/dir: xmp or embed without pyexiv2
       (EX_UNAVAILABLE)
  70   caption failed in the daemon, a 5xx answer or no answer in time (EX_SOFTWARE)
  73   the sidecar or --output file could not be written (EX_CANTCREAT)
  141  standard output was closed early (`phicapctl status | head -1`); nothing is printed
When files of one batch fail differently, the first of 69, 70, 73, 66, 65 that occurred wins.
"""
SEE_EXIT_CODES = "exit codes: 0 on success; `phicapctl --help` lists the others."


def resolve_socket(explicit: str | None, config: Path | None = None) -> Path:
    """Where the daemon listens (the order is in the module docstring). ``ConfigError`` for a
    named config file (``config`` or ``$PHICAPD_CONFIG``) that cannot be read."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(SOCKET_ENV):
        return Path(env)
    if config is None and (named := os.environ.get(CONFIG_ENV)):
        config = Path(named)
    if config is not None:
        if (configured := socket_from_config(config)) is not None:
            return configured
    else:
        # The system daemon's file, when this user may read it (it may be root's alone).
        with contextlib.suppress(ConfigError):
            if DEFAULT_CONFIG_PATH.is_file() and (configured := socket_from_config(DEFAULT_CONFIG_PATH)):
                return configured
    # The directory, not the socket: a user outside phicapd-clients cannot look inside it and
    # should be told "permission denied" there, not "no daemon" at a per-user path.
    if SYSTEM_SOCKET_PATH.parent.is_dir():
        return SYSTEM_SOCKET_PATH
    return user_socket_path()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    """A timeout: a finite number of seconds above zero (a socket refuses the rest)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phicapctl", description="Control a running phicapd.", epilog=EXIT_CODES)
    parser.add_argument(
        "--socket",
        help=f"control socket (default: ${SOCKET_ENV}, then the one --config names, then {SYSTEM_SOCKET_PATH} "
        "if it exists, then $XDG_RUNTIME_DIR/phicapd.sock)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"the daemon's configuration, to find its [control] socket (default: ${CONFIG_ENV}, "
        f"then {DEFAULT_CONFIG_PATH} if readable)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, help="seconds to wait for a non-caption answer"
    )
    parser.add_argument("--version", action="version", version=f"phicapctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        """A subcommand whose one-line description shows both in the list and in its own --help;
        the exit-code table is printed once, by ``phicapctl --help``."""
        return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.", epilog=SEE_EXIT_CODES)

    def json_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--json", action="store_true", help=what)

    def captioning(p: argparse.ArgumentParser, *, files: bool) -> None:
        default = "the prompt of the file's watch root, else the daemon's" if files else "the daemon's prompt"
        p.add_argument("--prompt", help=f"prompt to use (default: {default})")
        p.add_argument(
            "--max-new-tokens", type=_positive, help="longest caption in tokens (default: the daemon's setting)"
        )
        json_flag(p, "print one JSON object per image, errors included")
        p.add_argument(
            "--caption-timeout", type=_seconds, default=DEFAULT_CAPTION_TIMEOUT, help="seconds to wait for a caption"
        )

    def files(p: argparse.ArgumentParser) -> None:
        captioning(p, files=True)
        p.add_argument("--force", action="store_true", help="caption and replace sidecars the existing policy keeps")
        p.add_argument("--stdout", action="store_true", help="print captions only; write no sidecars")
        p.add_argument("-j", "--jobs", type=_positive, default=16, help="requests in flight")

    p = command("caption-file", "caption files and write their sidecars")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files (results in this order)")
    files(p)
    p.set_defaults(func=cmd_caption_file)

    p = command("caption-dir", "caption every image of a directory and write their sidecars")
    p.add_argument("directory", type=Path, metavar="DIR", help="the directory")
    p.add_argument("-r", "--recursive", action="store_true", help="include subdirectories")
    files(p)
    p.set_defaults(func=cmd_caption_dir)

    p = command("caption-url", "download an image (in the daemon) and print its caption")
    p.add_argument("url", help="http or https URL")
    p.add_argument("-o", "--output", type=Path, help="write the caption to this file, atomically (default: stdout)")
    captioning(p, files=False)
    p.set_defaults(func=cmd_caption_url)

    p = command("status", "show the model, queues, throughput and failures")
    json_flag(p, "print the daemon's status as one JSON object")
    p.set_defaults(func=cmd_status)

    command("health", "print the daemon's state; exit 0 only when a caption can be made now, else 69").set_defaults(
        func=cmd_health
    )

    p = command("failures", "list the images whose captioning failed")
    p.add_argument("--limit", type=_positive, default=50, help="list at most this many")
    json_flag(p, "print the list as one JSON array")
    p.set_defaults(func=cmd_failures)

    p = command("stale", "list images whose caption was made with other settings than their root's current ones")
    p.add_argument("directory", nargs="?", metavar="DIR", help="only images under this directory (default: every root)")
    json_flag(p, 'print {"stale": [...], "edited": [...]} as one JSON object')
    p.set_defaults(func=cmd_stale)

    p = command("orphans", "list the outputs (.txt, .json, .xmp) whose image is gone; needs no daemon")
    p.add_argument("directory", nargs="?", type=Path, metavar="DIR", help="look below DIR (default: every root)")
    p.set_defaults(func=cmd_orphans)

    p = command("recaption", "caption stale images again (see stale)")
    p.add_argument("directory", nargs="?", metavar="DIR", help="only images under this directory (default: every root)")
    p.add_argument("--stale", action="store_true", required=True, help="the images `phicapctl stale` lists")
    p.add_argument("--force", action="store_true", help="also replace captions edited since the daemon wrote them")
    p.set_defaults(func=cmd_recaption)

    p = command("retry", "re-queue failed images (all of them without PATH)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="failed images to re-queue (exit 65 if one is not failed)")
    p.set_defaults(func=cmd_retry)

    for name, text in (
        ("pause", "stop captioning the watched directories"),
        ("resume", "resume captioning the watched directories"),
        ("rescan", "rescan the watched directories for images without a sidecar"),
    ):
        command(name, text).set_defaults(func=cmd_simple)
    command("metrics", "print the daemon's Prometheus metrics").set_defaults(func=cmd_metrics)
    command("version", "print the client and daemon versions").set_defaults(func=cmd_version)
    return parser


# -- output helpers -----------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (elsewhere each file gets its
    plain line); ``summary`` is the line a batch ends with, which scripts parse."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr  # looked up now: a test (or a caller) may have replaced it
        self.enabled = self.stream.isatty() and total > 1
        self.done = self.skipped = self.failed = 0
        self.started = time.monotonic()

    @property
    def captioned(self) -> int:
        return self.done - self.skipped - self.failed

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.skipped += outcome.state == "skipped"
        self.failed += outcome.state == "failed"
        if self.enabled:
            filled = self.WIDTH * self.done // self.total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            line = f"\r\x1b[K[{bar}] {self.done}/{self.total} done, {self.skipped} skipped, {self.failed} failed"
            self.stream.write(line)
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()

    def summary(self) -> str:
        """``N captioned, M skipped, K failed in S s``: the exact form is public (scripts parse it)."""
        seconds = time.monotonic() - self.started
        return f"{self.captioned} captioned, {self.skipped} skipped, {self.failed} failed in {seconds:.1f} s"


def _outcome_json(o: Outcome) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(o.image), "state": o.state, "sidecar": str(o.sidecar) if o.sidecar else None}
    if o.result is not None:
        out |= o.result.model_dump()
    if o.code is not None:
        out["error"] = {"code": o.code, "message": o.message}
    if o.warning is not None:
        out["warning"] = o.warning
    return out


def _err(message: str) -> None:
    print(f"phicapctl: {display(message)}", file=sys.stderr)


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


# -- commands -------------------------------------------------------------------------------


def _batch_captioner(client: ControlClient, args: argparse.Namespace) -> BatchCaptioner:
    options = Options(
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, force=args.force, stdout=args.stdout, jobs=args.jobs
    )
    client.caption_timeout = args.caption_timeout
    # Fails early when the daemon is unreachable; its global sidecar policy is the fallback for a
    # daemon that predates /v1/sidecar (which gives each directory its watch root's policy), and
    # its upload limit lets a larger file be refused before it is read.
    status = client.status()
    return BatchCaptioner(client, options, fallback=status.sidecar, max_bytes=status.max_body_bytes)


class InOrder:
    """Passes outcomes on in the order of ``images``, though they finish in any order (``-j``)."""

    def __init__(self, images: list[Path], emit: Callable[[Outcome], None]) -> None:
        self._waiting: dict[Path, list[int]] = {}
        for index, path in enumerate(images):
            self._waiting.setdefault(path, []).append(index)
        self._done: dict[int, Outcome] = {}
        self._next = 0
        self._emit = emit

    def add(self, outcome: Outcome) -> None:
        slots = self._waiting.get(outcome.image)
        if not slots:  # not one of ``images`` as given: nothing to keep it in order with
            self._emit(outcome)
            return
        self._done[slots.pop(0)] = outcome
        while self._next in self._done:
            self._emit(self._done.pop(self._next))
            self._next += 1


def _caption_paths(
    captioner: BatchCaptioner, args: argparse.Namespace, images: list[Path], *, summary: bool = False
) -> int:
    """``summary`` (caption-dir): the bar, not a line per skipped file, on a terminal, and the
    count line last on stderr."""
    progress = Progress(len(images))
    many = len(images) > 1
    quiet_skips = summary and progress.enabled

    def report(o: Outcome) -> None:
        progress.clear()
        if o.warning is not None:
            _err(o.warning)
        if args.json:
            _print_json(_outcome_json(o))
        elif o.state == "failed":
            _err(o.message or o.code or "failed")
        elif o.state == "skipped":
            if not quiet_skips:
                _err(f"{o.image}: skipped, the existing-sidecar policy keeps {o.sidecar} (--force to caption again)")
        elif o.result is not None:
            print(f"{display(o.image)}: {o.result.caption}" if many else o.result.caption, flush=True)

    in_order = InOrder(images, report)

    def done(o: Outcome) -> None:
        progress.update(o)
        in_order.add(o)

    outcomes = captioner.run(images, done)
    if summary:
        progress.clear()  # the count line takes the bar's place
        print(progress.summary(), file=sys.stderr, flush=True)
    else:
        progress.finish()
    return batch.exit_code(outcomes)


def cmd_caption_file(client: ControlClient, args: argparse.Namespace) -> int:
    return _caption_paths(_batch_captioner(client, args), args, list(args.paths))


def cmd_caption_dir(client: ControlClient, args: argparse.Namespace) -> int:
    if not args.directory.is_dir():
        _err(f"{args.directory}: {'not a directory' if args.directory.exists() else 'no such directory'}")
        return batch.EX_NOINPUT
    captioner = _batch_captioner(client, args)
    images = captioner.images_in(args.directory, recursive=args.recursive)
    if not images:
        _err(f"{args.directory}: no images")
        print(Progress(0).summary(), file=sys.stderr)
        return batch.EX_OK
    return _caption_paths(captioner, args, images, summary=True)


def _url_failed(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """One error line on stderr; with ``--json`` also the error object on stdout, as for files."""
    if args.json:
        _print_json({"url": args.url, "state": "failed", "error": {"code": code, "message": message}})
    _err(message)
    return exit_code


def cmd_caption_url(client: ControlClient, args: argparse.Namespace) -> int:
    client.caption_timeout = args.caption_timeout
    try:
        result = client.caption_url(args.url, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    except ControlClientError as e:
        if not args.json:
            raise  # main() reports it with the exit code of its kind
        return _url_failed(args, e.code, e.message, _exit_code_of(e))
    if args.output is not None:
        try:
            write_sidecar(args.output, result.caption)
        except OSError as e:
            return _url_failed(
                args, "output_unwritable", f"cannot write {args.output}: {e.strerror or e}", batch.EX_CANTCREAT
            )
    if args.json:
        _print_json(result.model_dump())
    elif args.output is None:
        print(result.caption)
    return batch.EX_OK


def _flatten(value: Any, key: str = "") -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={_flatten(v, k)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        if key and all(isinstance(v, str | int | float) for v in value):
            return ",".join(map(str, value)) or "-"  # a short list inside a record: formats=txt,json
        return f"{len(value)} entries"
    if value is None:
        return "-"
    if isinstance(value, float) and (key == "at" or key.endswith("_at")):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))  # epoch seconds
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


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
        _print_json(status)
        return batch.EX_OK
    if reason := _loading_reason(status):
        print(f"not ready: {reason}")
    if refused := (status.pop("config", None) or {}).get("reload_refused"):
        # Until a reload succeeds the daemon runs an older configuration than the file's.
        print(f"config: reload refused at {_flatten(refused.get('at'), 'at')}: {refused.get('reason')}")
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
        print(f"{key:<{width}}  {_flatten(value)}")
        if isinstance(value, list):
            for item in value:
                print(f"{'':<{width}}  - {_flatten(item)}")
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
        _print_json(rows)
        return batch.EX_OK
    if not rows:
        print("no failures")
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("path", "code")}
        print(f"{row.get('path', '?')}  {row.get('code', '?')}  {_flatten(rest)}")
    return batch.EX_OK


def _directory_arg(args: argparse.Namespace) -> str | None:
    # The daemon keeps absolute paths; make a relative one match.
    return os.path.abspath(args.directory) if args.directory is not None else None


def cmd_stale(client: ControlClient, args: argparse.Namespace) -> int:
    reply = client.stale(_directory_arg(args))
    if args.json:
        _print_json(reply.model_dump())
        return batch.EX_OK
    for entry in reply.stale:
        print(entry.path)
    if reply.edited:
        n = len(reply.edited)
        _err(f"{n} more edited since the daemon wrote them, kept (recaption --stale --force redoes them)")
    return batch.EX_OK


def cmd_recaption(client: ControlClient, args: argparse.Namespace) -> int:
    reply = client.recaption_stale(_directory_arg(args), force=args.force)
    kept = f" ({reply.edited_kept} edited by hand kept)" if reply.edited_kept else ""
    print(f"re-queued {reply.requeued}{kept}")
    return batch.EX_OK


def cmd_retry(client: ControlClient, args: argparse.Namespace) -> int:
    # The daemon records absolute paths; make relative ones match.
    paths = list(dict.fromkeys(os.path.abspath(p) for p in args.paths))
    requeued = client.retry(paths or None)
    print(f"re-queued {requeued}")
    if paths and requeued < len(paths):
        # The daemon answers with a count only: name the path when there is just one.
        which = paths[0] if len(paths) == 1 else f"{len(paths) - requeued} of the {len(paths)} paths"
        _err(f"{which}: not a failed image (phicapctl failures lists them)")
        return batch.EX_DATAERR
    return batch.EX_OK


def cmd_simple(client: ControlClient, args: argparse.Namespace) -> int:
    action: Callable[[], None] = getattr(client, args.command)
    action()
    print("ok")
    return batch.EX_OK


def cmd_metrics(client: ControlClient, args: argparse.Namespace) -> int:
    sys.stdout.write(client.metrics())
    return batch.EX_OK


def cmd_version(client: ControlClient, args: argparse.Namespace) -> int:
    print(f"phicapctl {__version__}")
    daemon = client.version()
    print(f"phicapd {daemon.version} (api v{daemon.api})")
    return batch.EX_OK


def _exit_code_of(e: ControlClientError) -> int:
    if isinstance(e, DaemonUnreachable):
        return batch.EX_UNAVAILABLE
    return batch.EX_DATAERR if isinstance(e, RequestRejected) else batch.EX_SOFTWARE


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head -1``): stop without a word, like a tool SIGPIPE kills.

    stdout is pointed at /dev/null so that the interpreter's last flush fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EX_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    # A name that is not UTF-8 (``phicapd.fsnames``) in a table or in --json output reads as
    # ``\udcff`` rather than ending phicapctl with a UnicodeEncodeError (stdout is strict).
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, so that a closed pipe is seen while we can still handle it
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EX_USAGE
    try:
        socket = resolve_socket(args.socket, args.config)
    except ConfigError as e:
        _err(str(e))
        return batch.EX_NOINPUT
    client = ControlClient(socket, timeout=args.timeout)
    try:
        return args.func(client, args)
    except DaemonUnreachable as e:
        _err(e.message)
        return batch.EX_UNAVAILABLE
    except RequestRejected as e:
        _err(f"rejected ({e.code}): {e.message}")
        return batch.EX_DATAERR
    except ControlClientError as e:
        _err(f"failed ({e.code}): {e.message}")
        return batch.EX_SOFTWARE
    except ValidationError as e:
        _err(f"unexpected answer from the daemon: {e}")
        return batch.EX_SOFTWARE
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
