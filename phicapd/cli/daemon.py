"""``phicapd``: run the daemon and its maintenance commands.

    phicapd run [--config PATH] [--reload-on-hup]
                                           run in the foreground (what systemd starts); SIGHUP
                                           reloads under systemd or with --reload-on-hup, and
                                           stops a run in a terminal
    phicapd check-config [--config PATH]   validate and print the effective configuration
    phicapd download-model [--config PATH] fetch weights, configs and tokenizer into the HF cache
    phicapd make-test-model DIR            write a tiny random checkpoint for smoke tests
    phicapd install-unit [--config PATH]   install the systemd units and the watched-paths drop-in

Exit codes: 0 ok; 78 (EX_CONFIG) for any configuration problem, which systemd does not restart
(``RestartPreventExitStatus=78``); 75 (EX_TEMPFAIL) when the model cannot be loaded yet (the hub
or the network failed while fetching it for an hour; the GPU is not usable, at once), which
systemd restarts; 70 (EX_SOFTWARE) when the model broke while running (a CUDA fault), so
systemd restarts it with a fresh CUDA context; 1 for other failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from phicapd import __version__
from phicapd.cli.helpformat import HelpFormatter
from phicapd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    SYSTEM_SOCKET_PATH,
    Settings,
    load_settings,
    redact_userinfo,
)
from phicapd.errors import EX_CONFIG, EX_TEMPFAIL, ConfigError, ModelUnavailable, PhicapError
from phicapd.log import configure_logging, get_logger, is_journal_stream

EXIT_CODES = """\
exit codes:
  0   success
  1   another failure: a model load that failed, missing or mismatched weights
  70  the model broke while running (a CUDA fault); systemd restarts with a fresh context
  75  the model cannot be loaded yet (hub or network down for an hour, GPU not usable)
  78  a configuration problem, named in one line; systemd does not restart (EX_CONFIG)
"""
SEE_EXIT_CODES = "exit codes: 0 on success, 78 for a configuration problem; `phicapd --help` lists the others."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phicapd",
        description="Image-captioning daemon (Phi-3.5-vision).",
        epilog=EXIT_CODES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"phicapd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        description = f"{text[0].upper()}{text[1:]}."
        # The exit-code table is printed once, by ``phicapd --help``.
        return sub.add_parser(
            name, help=text, description=description, epilog=SEE_EXIT_CODES, formatter_class=HelpFormatter
        )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"TOML configuration file (default: ${CONFIG_ENV}, then {DEFAULT_CONFIG_PATH} if it exists)",
        )
        return p

    p = with_config(command("run", "run the daemon in the foreground (what systemd starts)"))
    p.add_argument(
        "--reload-on-hup",
        action="store_true",
        default=None,
        help="SIGHUP re-reads the configuration, as under systemd (default there); "
        "elsewhere SIGHUP (a closed terminal) stops the daemon",
    )
    with_config(command("check-config", "validate the configuration and the paths it names; print the effective one"))
    with_config(command("download-model", "pre-fetch the model into the Hugging Face cache"))
    p = command("make-test-model", "write a tiny random-weight checkpoint in Microsoft's layout, to try phicapd out")
    p.add_argument("directory", type=Path, help="where to write it (created if missing); then set [model] path")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p = with_config(command("install-unit", "install the systemd units and the watched-paths drop-in"))
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="where the units go")
    p.add_argument("--dropin-only", action="store_true", help="write only the ReadWritePaths= drop-in")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    # $PHICAPD_CONFIG names the file for phicapctl too, so the two agree on the socket.
    named = os.environ.get(CONFIG_ENV)
    return load_settings(args.config or (Path(named) if named else None))


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log.format, settings.log.level)
    from phicapd.service import run

    return run(settings, settings_loader=lambda: _settings(args), reload_on_hup=args.reload_on_hup)


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # What ``run`` refuses, tried as this user, short of loading weights: the watched roots, the
    # state and socket directories (not the system socket's: phicapd.socket makes and owns that
    # one), then the backend (device, checkpoint directory; CA bundle, API key file).
    from phicapd.preflight import check_backend, check_startup

    check_startup(settings, socket_inherited=settings.control.socket == SYSTEM_SOCKET_PATH)
    note = check_backend(settings)
    if note is not None:
        print(f"phicapd: note: {note}", file=sys.stderr)
    effective = settings.model_dump(mode="json")
    if effective["fetch"]["proxy"]:  # may hold a password; the output ends up in tickets
        effective["fetch"]["proxy"] = redact_userinfo(effective["fetch"]["proxy"])
    print(json.dumps(effective, indent=2))
    return 0


def _download_model(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log.format, settings.log.level)
    from phicapd.model.loading import download_model

    path = download_model(settings.model)
    print(path)
    return 0


def _make_test_model(args: argparse.Namespace) -> int:
    from phicapd.model.testmodel import make_test_model

    try:
        print(make_test_model(args.directory, seed=args.seed))
    except OSError as e:
        where = e.filename or args.directory
        raise PhicapError(f"cannot write {where}: {e.strerror or e}", code="output_unwritable") from None
    return 0


def _install_unit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from phicapd.systemd import install_unit

    for path in install_unit(settings, unit_dir=args.unit_dir, copy_units=not args.dropin_only):
        print(path)
    print("now run: systemctl daemon-reload && systemctl enable --now phicapd.socket phicapd.service")
    return 0


_COMMANDS = {
    "run": _run,
    "check-config": _check_config,
    "download-model": _download_model,
    "make-test-model": _make_test_model,
    "install-unit": _install_unit,
}


def _report(error: PhicapError) -> None:
    """The error on stderr; at priority "err" (``<3>``) when stderr is the journal."""
    prefix = "<3>" if is_journal_stream(sys.stderr) else ""
    print("\n".join(prefix + line for line in f"phicapd: {error}".split("\n")), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        _report(e)
        return EX_CONFIG
    except PhicapError as e:
        get_logger("phicapd").error("fatal", code=e.code, error=str(e))
        _report(e)
        return EX_TEMPFAIL if isinstance(e, ModelUnavailable) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
