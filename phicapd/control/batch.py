"""Client-side captioning of files: plan, send concurrently, write sidecars.

phicapctl reads every image with the caller's own permissions and writes the sidecar itself;
the daemon only ever sees bytes (no confused deputy). For every directory, ``/v1/sidecar`` tells
which watch root owns it: that root's include/ignore patterns feed the daemon's own naming rule
(``pipeline.paths.list_images`` into ``pipeline.sidecar``), and its ``existing`` policy decides
whether a sidecar already there is kept. Each caption request names the file's path, so the daemon
applies the root's prompt, prefix and suffix: a file captioned by hand looks exactly like one the
watcher captioned, under the same name.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from phicapd.config import JSON_EXTENSION, ExistingPolicy, WatchRoot
from phicapd.control.client import ControlClient, ControlClientError, DaemonUnreachable, RequestRejected
from phicapd.control.protocol import CaptionResult, SidecarInfo, SidecarPolicy
from phicapd.pipeline import paths
from phicapd.pipeline.formats import Provenance, json_sidecar_text, model_and_revision
from phicapd.pipeline.sidecar import Claims, SiblingIndex, changed_ns, policy_keeps, write_atomic, write_sidecar

# sysexits(3), shared with phicapctl.
EX_OK = 0
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73

# When several files fail differently, the exit code reports the most fundamental problem.
_SEVERITY = (EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_NOINPUT, EX_DATAERR)


@dataclass(frozen=True, slots=True)
class Options:
    prompt: str | None = None
    max_new_tokens: int | None = None
    force: bool = False
    stdout: bool = False  # print only, write no sidecar
    jobs: int = 16


@dataclass(frozen=True, slots=True)
class Outcome:
    image: Path
    sidecar: Path | None
    state: Literal["captioned", "skipped", "failed"]
    result: CaptionResult | None = None
    code: str | None = None
    message: str | None = None
    exit_code: int = EX_OK


def config_key(image: Path) -> str:
    """The path the daemon matches against its watch roots (their prompt, prefix and suffix).

    The directory is resolved, the file name is not: a symlinked image's sidecar goes beside the
    link, so the link's directory decides, as it does for the watcher.
    """
    return os.path.join(os.path.realpath(image.parent), image.name)


def exit_code(outcomes: Iterable[Outcome]) -> int:
    codes = {o.exit_code for o in outcomes}
    return next((c for c in _SEVERITY if c in codes), EX_OK)


class Naming:
    """The sidecar naming and ``existing`` policy of one directory, as the daemon applies them.

    ``root`` is the watch root that owns the directory, rebuilt from ``/v1/sidecar`` (only the
    fields the naming rule reads), or for an unwatched directory a default root on the directory
    itself, whose include patterns are the default image extensions.
    """

    def __init__(
        self,
        directory: Path,
        extension: str,
        existing: ExistingPolicy,
        root: WatchRoot | None,
        claims: dict[str, str] | None = None,
        formats: Iterable[str] = ("txt",),
    ) -> None:
        # phicapctl writes the per-image formats; the first is what the policy and the naming
        # are judged by, as in the daemon (``Settings.primary_extension``).
        self.extensions = [extension] if "txt" in formats else []
        if "json" in formats:
            self.extensions.append(JSON_EXTENSION)
        self.extensions = self.extensions or [extension]
        self.extension = self.extensions[0]
        self.existing = existing
        naming_root = root if root is not None else WatchRoot(path=directory, recursive=False)
        self.names = frozenset(paths.list_images(directory, naming_root))
        self._index = SiblingIndex(self.names)
        self._claims = Claims(claims, directory)
        # Tell the daemon which sidecar we write, so it stays that image's (a daemon that
        # reports no claims predates them and would refuse the parameter).
        self.reports_sidecar = root is not None and claims is not None
        self._taken: frozenset[str] | None = None

    @classmethod
    def from_policy(cls, directory: Path, policy: SidecarPolicy) -> Naming:
        root = None
        if policy.root is not None:
            r = policy.root
            root = WatchRoot(path=Path(r.path), recursive=r.recursive, include=r.include, ignore=r.ignore)
        return cls(directory, policy.extension, policy.existing, root, policy.claims, policy.formats)

    def keeps(self, image_stat: os.stat_result, sidecar: Path) -> bool:
        """Whether the ``existing`` policy keeps ``sidecar`` as it is (``--force`` aside): under
        ``skip`` while it is at least as new as the image, under ``only-missing`` whenever it exists,
        under ``overwrite`` never."""
        return not self.to_write(image_stat, sidecar)

    def to_write(self, image_stat: os.stat_result, sidecar: Path) -> list[str]:
        """The extensions of the files the policy does not keep: each format is judged alone."""
        changed = changed_ns(image_stat)
        return [e for e in self.extensions if not policy_keeps(self.existing, changed, self.file_of(sidecar, e))]

    def file_of(self, sidecar: Path, extension: str) -> Path:
        """The file with ``extension`` beside ``sidecar`` (the same base)."""
        return sidecar.with_name(sidecar.name[: -len(self.extension)] + extension)

    def sidecar_for(self, image: Path) -> Path:
        """Where the sidecar of ``image`` (in this directory, maybe through a symlink) goes."""
        if image.name in self.names:
            return self._index.sidecar_for(image, self.extension, self._claims)
        # An image its root does not caption (its patterns leave it out): the daemon never writes
        # its sidecar, so it must not take a name the daemon gives one of the root's images.
        sidecar = SiblingIndex([*self.names, image.name]).sidecar_for(image, self.extension, self._claims)
        if image.name in self._claims.by_image:
            return sidecar
        if self._taken is None:
            self._taken = frozenset(
                self._index.sidecar_for(image.with_name(n), self.extension, self._claims).name for n in self.names
            )
        return image.with_name(image.name + self.extension) if sidecar.name in self._taken else sidecar


def _json_text(result: CaptionResult, data: bytes) -> str:
    """The JSON sidecar of a caption phicapctl got (``pipeline.formats``), with the daemon's
    provenance; a reply without one (it should not happen: it is asked for) keeps the model."""
    given = result.provenance or {}
    model, revision = model_and_revision(result.model)
    provenance = Provenance(
        str(given.get("model", model)),
        given.get("revision", revision),
        str(given.get("backend", "")),
        str(given.get("prompt", "")),
        dict(given.get("generation", {})),
    )
    return json_sidecar_text(result.caption, provenance, hashlib.sha256(data).hexdigest(), time.time())


def _failed(image: Path, sidecar: Path | None, code: str, message: str, exit_code: int) -> Outcome:
    return Outcome(image, sidecar, "failed", code=code, message=message, exit_code=exit_code)


class BatchCaptioner:
    """Caption many files through one client, ``jobs`` requests in flight so the GPU batches them."""

    def __init__(self, client: ControlClient, options: Options, fallback: SidecarInfo | None = None) -> None:
        """``fallback``: the global policy, for a daemon without ``/v1/sidecar`` (asked of
        ``/v1/status`` when needed and not given)."""
        self.client = client
        self.options = options
        self._fallback = fallback
        self._naming: dict[Path, Naming] = {}
        self._unreachable = threading.Event()

    def _naming_of(self, directory: Path, key: str) -> Naming:
        """The naming of ``directory`` (resolved), asked of the daemon once per directory."""
        naming = self._naming.get(directory)
        if naming is None:
            policy = self.client.sidecar_policy(key)
            if policy is None:  # a daemon from before /v1/sidecar: global policy, default naming
                if self._fallback is None:
                    self._fallback = self.client.status().sidecar
                policy = SidecarPolicy(extension=self._fallback.extension, existing=self._fallback.existing)
            naming = self._naming[directory] = Naming.from_policy(directory, policy)
        return naming

    def images_in(self, directory: Path, *, recursive: bool) -> list[Path]:
        """The images of ``directory`` (and its non-hidden subdirectories), sorted: in a watched
        directory those its root captions (include/ignore patterns), elsewhere the default image
        extensions, so caption-dir picks exactly the files the watcher would."""
        found: list[Path] = []
        for top, dirs, _ in os.walk(directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            resolved = Path(os.path.realpath(top))
            naming = self._naming_of(resolved, str(resolved / "_"))  # only the directory matters
            found.extend(Path(top) / name for name in sorted(naming.names))
        return found

    def _plan(self, image: Path) -> Outcome | tuple[Path, Path | None]:
        """Either a finished outcome (skipped, unreadable) or the work: (image, sidecar)."""
        try:
            st = image.stat()
        except OSError as e:
            return _failed(image, None, "input_unreadable", f"{image}: {e.strerror}", EX_NOINPUT)
        if not os.path.isfile(image):
            return _failed(image, None, "input_unreadable", f"{image}: not a regular file", EX_NOINPUT)
        if self.options.stdout:
            return image, None
        if self._unreachable.is_set():
            return _failed(image, None, DaemonUnreachable.code, "not sent: the daemon is unreachable", EX_UNAVAILABLE)
        key = config_key(image)
        try:
            naming = self._naming_of(Path(key).parent, key)
        except ControlClientError as e:
            return self._client_failed(image, None, e)
        sidecar = naming.sidecar_for(image)
        if not self.options.force and naming.keeps(st, sidecar):
            return Outcome(image, sidecar, "skipped")
        if not os.access(image.parent, os.W_OK | os.X_OK):
            # Refuse before spending GPU time on a caption that could not be saved.
            return _failed(
                image,
                sidecar,
                "sidecar_unwritable",
                f"{sidecar}: directory {image.parent} is not writable",
                EX_CANTCREAT,
            )
        return image, sidecar

    def _client_failed(self, image: Path, sidecar: Path | None, e: ControlClientError) -> Outcome:
        """The outcome of a request the daemon refused or never got; an unreachable daemon stops the rest."""
        if isinstance(e, DaemonUnreachable):
            self._unreachable.set()
            return _failed(image, sidecar, e.code, e.message, EX_UNAVAILABLE)
        code = EX_DATAERR if isinstance(e, RequestRejected) else EX_SOFTWARE
        # The daemon names the file it was sent ("photo.jpg: ..."); say the path once instead.
        detail = e.message.removeprefix(f"{image.name}: ")
        return _failed(image, sidecar, e.code, f"{image}: {detail}", code)

    def _caption(self, image: Path, sidecar: Path | None) -> Outcome:
        if self._unreachable.is_set():
            return _failed(
                image, sidecar, DaemonUnreachable.code, "not sent: the daemon is unreachable", EX_UNAVAILABLE
            )
        try:
            data = image.read_bytes()
        except OSError as e:
            return _failed(image, sidecar, "input_unreadable", f"{image}: {e.strerror}", EX_NOINPUT)
        key = config_key(image)
        naming = self._naming.get(Path(key).parent)
        report = sidecar is not None and naming is not None and naming.reports_sidecar
        try:
            result = self.client.caption_bytes(
                data,
                name=image.name,
                prompt=self.options.prompt,
                max_new_tokens=self.options.max_new_tokens,
                path=key,
                sidecar=sidecar.name if report and sidecar is not None else None,
                provenance=sidecar is not None and naming is not None and JSON_EXTENSION in naming.extensions,
            )
        except ControlClientError as e:
            return self._client_failed(image, sidecar, e)
        if sidecar is not None:
            assert naming is not None
            try:
                extensions = naming.extensions
                if not self.options.force:
                    extensions = naming.to_write(os.stat(image), sidecar) or extensions
                for extension in extensions:
                    target = naming.file_of(sidecar, extension)
                    if extension == JSON_EXTENSION:
                        write_atomic(target, _json_text(result, data) + "\n")
                    else:
                        write_sidecar(target, result.caption)
            except OSError as e:
                return Outcome(
                    image,
                    sidecar,
                    "failed",
                    result=result,
                    code="sidecar_unwritable",
                    message=f"cannot write {sidecar}: {e.strerror or e}",
                    exit_code=EX_CANTCREAT,
                )
        return Outcome(image, sidecar, "captioned", result=result)

    def run(self, images: list[Path], on_done: Callable[[Outcome], None] = lambda o: None) -> list[Outcome]:
        """Caption ``images``; ``on_done`` is called in this thread as each one finishes."""
        outcomes: list[Outcome] = []
        for outcome in self._iter(images):
            outcomes.append(outcome)
            on_done(outcome)
        return outcomes

    def _iter(self, images: list[Path]) -> Iterator[Outcome]:
        work: list[tuple[Path, Path | None]] = []
        for image in images:
            planned = self._plan(image)
            if isinstance(planned, Outcome):
                yield planned
            else:
                work.append(planned)
        if not work:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.options.jobs, len(work)))) as pool:
            futures = [pool.submit(self._caption, image, sidecar) for image, sidecar in work]
            for future in as_completed(futures):
                yield future.result()
