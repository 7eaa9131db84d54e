"""phicapctl's caption commands: caption-file, caption-dir and caption-url.

Files are read with the caller's permissions and their bytes sent to the daemon; the outputs are
written here (``control.batch``). Outcomes are reported in the order the files were given, with a
progress bar on a terminal and, for caption-dir, the count line scripts parse.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from phicapd.cli.output import err, exit_code_of, print_json
from phicapd.control import batch
from phicapd.control.batch import BatchCaptioner, Options, Outcome
from phicapd.control.client import ControlClient, ControlClientError
from phicapd.fsnames import display
from phicapd.outputs.atomic import write_sidecar


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
            err(o.warning)
        if args.json:
            print_json(_outcome_json(o))
        elif o.state == "failed":
            err(o.message or o.code or "failed")
        elif o.state == "skipped":
            if not quiet_skips:
                err(f"{o.image}: skipped, the existing-sidecar policy keeps {o.sidecar} (--force to caption again)")
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
        err(f"{args.directory}: {'not a directory' if args.directory.exists() else 'no such directory'}")
        return batch.EX_NOINPUT
    captioner = _batch_captioner(client, args)
    images = captioner.images_in(args.directory, recursive=args.recursive)
    if not images:
        err(f"{args.directory}: no images")
        print(Progress(0).summary(), file=sys.stderr)
        return batch.EX_OK
    return _caption_paths(captioner, args, images, summary=True)


def _url_failed(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """One error line on stderr; with ``--json`` also the error object on stdout, as for files."""
    if args.json:
        print_json({"url": args.url, "state": "failed", "error": {"code": code, "message": message}})
    err(message)
    return exit_code


def cmd_caption_url(client: ControlClient, args: argparse.Namespace) -> int:
    client.caption_timeout = args.caption_timeout
    try:
        result = client.caption_url(args.url, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    except ControlClientError as e:
        if not args.json:
            raise  # main() reports it with the exit code of its kind
        return _url_failed(args, e.code, e.message, exit_code_of(e))
    if args.output is not None:
        try:
            write_sidecar(args.output, result.caption)
        except OSError as e:
            return _url_failed(
                args, "output_unwritable", f"cannot write {args.output}: {e.strerror or e}", batch.EX_CANTCREAT
            )
    if args.json:
        print_json(result.model_dump())
    elif args.output is None:
        print(result.caption)
    return batch.EX_OK
