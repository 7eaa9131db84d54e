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

This module resolves the socket, parses the command line and runs the small commands; the
caption commands are ``ctl_caption``'s, the reports (status, health, failures) ``ctl_status``'s,
orphans is ``orphans``', and the output conventions they share are ``output``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from phicapd import __version__
from phicapd.cli.ctl_caption import cmd_caption_dir, cmd_caption_file, cmd_caption_url
from phicapd.cli.ctl_status import cmd_failures, cmd_health, cmd_status
from phicapd.cli.helpformat import HelpFormatter
from phicapd.cli.orphans import cmd_orphans
from phicapd.cli.output import err, print_json
from phicapd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    SYSTEM_SOCKET_PATH,
    socket_from_config,
    user_socket_path,
)
from phicapd.control import batch
from phicapd.control.client import (
    DEFAULT_CAPTION_TIMEOUT,
    DEFAULT_TIMEOUT,
    ControlClient,
    ControlClientError,
    DaemonUnreachable,
    RequestRejected,
)
from phicapd.errors import ConfigError

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


# -- commands -------------------------------------------------------------------------------


def _directory_arg(args: argparse.Namespace) -> str | None:
    # The daemon keeps absolute paths; make a relative one match.
    return os.path.abspath(args.directory) if args.directory is not None else None


def cmd_stale(client: ControlClient, args: argparse.Namespace) -> int:
    reply = client.stale(_directory_arg(args))
    if args.json:
        print_json(reply.model_dump())
        return batch.EX_OK
    for entry in reply.stale:
        print(entry.path)
    if reply.edited:
        n = len(reply.edited)
        err(f"{n} more edited since the daemon wrote them, kept (recaption --stale --force redoes them)")
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
        err(f"{which}: not a failed image (phicapctl failures lists them)")
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
        err(str(e))
        return batch.EX_NOINPUT
    client = ControlClient(socket, timeout=args.timeout)
    try:
        return args.func(client, args)
    except DaemonUnreachable as e:
        err(e.message)
        return batch.EX_UNAVAILABLE
    except RequestRejected as e:
        err(f"rejected ({e.code}): {e.message}")
        return batch.EX_DATAERR
    except ControlClientError as e:
        err(f"failed ({e.code}): {e.message}")
        return batch.EX_SOFTWARE
    except ValidationError as e:
        err(f"unexpected answer from the daemon: {e}")
        return batch.EX_SOFTWARE
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
