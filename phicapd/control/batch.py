"""Client-side captioning of files: plan, send concurrently, write sidecars.

phicapctl reads every image with the caller's own permissions and writes the sidecar itself;
the daemon only ever sees bytes (no confused deputy). For every directory, ``/v1/sidecar`` tells
which watch root owns it: that root's include/ignore patterns feed the daemon's own naming rule
(``pipeline.paths.list_images`` into ``outputs.naming``), and its ``existing`` policy decides
whether a sidecar already there is kept. Each caption request names the file's path, so the daemon
applies the root's prompt, prefix and suffix: a file captioned by hand looks exactly like one the
watcher captioned, under the same name.

Every format of the root is written, each judged by the policy on its own as the daemon's writer
judges it, in the order that keeps a caption whole: the image itself (``embed``), the XMP sidecar,
``photo.txt``/``photo.json``, and last the report to the daemon (``/v1/captioned``), whose journal
then tracks the caption like its own (the scans, ``phicapctl stale``). A watch root's
``metadata.jsonl`` is the daemon's writer's: it merges the reported caption in. Outside every root
phicapctl keeps the directory's manifest itself, once per directory at the end of the run.

An image is stat'ed before it is read: one over the daemon's ``max_body_bytes`` (``/v1/status``)
is refused unread, one that is not a regular file (a named pipe, a device) without blocking
(``outputs.safe_files``).
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

from pydantic import ValidationError

from phicapd.config import MANIFEST_NAME, ControlSettings, ExistingPolicy, OutputFormat, WatchRoot, XmpNaming
from phicapd.control.client import ControlClient, ControlClientError, DaemonUnreachable, RequestRejected
from phicapd.control.protocol import CaptionedRequest, CaptionResult, SidecarInfo, SidecarPolicy
from phicapd.errors import EMBED_RAW_REFUSED, SIDECAR_TOO_LARGE
from phicapd.image_types import is_raw_name
from phicapd.metadata_library import MetadataUnavailable, require_pyexiv2
from phicapd.outputs import metadata, safe_files
from phicapd.outputs.formats.json import json_sidecar_text
from phicapd.outputs.formats.jsonl import Manifest, update_manifest
from phicapd.outputs.freshness import changed_ns
from phicapd.outputs.naming import Claims, SiblingIndex
from phicapd.outputs.plan import WritePlan
from phicapd.outputs.provenance import Provenance, model_and_revision
from phicapd.outputs.root import PRIMARY_ORDER, Known, RootOutputs, sidecar_base
from phicapd.pipeline import paths
from phicapd.raw_roots import default_include

# sysexits(3), shared with phicapctl.
EX_OK = 0
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73

#: The largest image a daemon that does not report its ``max_body_bytes`` takes: the default.
DEFAULT_MAX_BYTES: int = ControlSettings.model_fields["max_body_bytes"].default
IMAGE_TOO_LARGE = "image_too_large"  # the daemon's code for it (``phicapd.imaging``)

EMBED_RAW_MESSAGE = (
    'a camera raw file cannot take an embedded caption, and the formats here include "embed" (its '
    "watch root's, or [sidecar] formats outside every root); not sent. Caption raw files into XMP "
    'sidecars: a root of their own with formats = ["xmp"]'
)

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
    # Captioned and written, but something beside it did not work out (the daemon did not
    # record the caption): said on stderr, the exit code unchanged.
    warning: str | None = None


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
        xmp_naming: XmpNaming = "stem",
        tracked: bool = False,
    ) -> None:
        # The outputs of the directory's root, judged as the daemon judges them (``outputs.root``).
        chosen = tuple(f for f in PRIMARY_ORDER if f in set(formats)) or ("txt",)
        self.outputs = RootOutputs(chosen, existing, extension, xmp_naming)
        # The naming rule names the first per-image file; a root with none (``embed``,
        # ``jsonl``) keeps the image's stem as its base, and claims nothing.
        self.named = self.outputs.named_extension is not None
        self.extension = self.outputs.named_extension or extension
        # Under a root the manifest is the daemon's writer's (it has no lock against another
        # writer); only outside every root does phicapctl keep it.
        self.manifest = "jsonl" in chosen and root is None
        # The daemon records what phicapctl writes under a root (``/v1/captioned``), keyed by the
        # settings key its caption reply carries.
        self.tracked = tracked and root is not None
        self.existing = existing
        naming_root = root if root is not None else WatchRoot(path=directory, recursive=False)
        if root is None and "embed" in chosen:  # as a root that embeds: no raw files (``raw_roots``)
            naming_root.include = default_include(raw=False)
        self.names = frozenset(paths.list_images(directory, naming_root))
        self._index = SiblingIndex(self.names)
        self._claims = Claims(claims, directory)
        # Tell the daemon which sidecar we write, so it stays that image's (a daemon that
        # reports no claims predates them and would refuse the parameter).
        self.reports_sidecar = root is not None and claims is not None and self.named
        self._taken: frozenset[str] | None = None

    @classmethod
    def from_policy(cls, directory: Path, policy: SidecarPolicy) -> Naming:
        root = None
        if policy.root is not None:
            r = policy.root
            root = WatchRoot(path=Path(r.path), recursive=r.recursive, include=r.include, ignore=r.ignore)
        # A daemon that reports ``xmp_naming`` also keys its captions and takes ``/v1/captioned``.
        tracked = "xmp_naming" in policy.model_fields_set
        formats, naming = policy.formats, policy.xmp_naming
        return cls(directory, policy.extension, policy.existing, root, policy.claims, formats, naming, tracked)

    def base_of(self, image: Path, sidecar: Path) -> str:
        """The base of ``image``'s per-image files, given its rule-named ``sidecar``."""
        return sidecar.name[: -len(self.extension)] if self.named else sidecar_base(image)

    def primary(self, image: Path, sidecar: Path) -> Path:
        """The output the daemon's journal names for ``image`` (its first per-image file, else the
        image itself, else the manifest): what a skipped or written outcome shows."""
        return self.outputs.primary(image, self.base_of(image, sidecar))

    def missing(
        self, image: Path, image_stat: os.stat_result, sidecar: Path, previous: str | None = None
    ) -> list[OutputFormat]:
        """The formats whose output the policy does not keep, each judged on its own
        (``RootOutputs.missing``; phicapctl has no journal). ``previous``: the caption last written
        beside the image (what its files held before this write): an embedded description equal
        to it is ours, and replaced with the new caption; any other is someone else's and kept."""
        known = None if previous is None else Known(previous, False, None, None, 0.0)
        base = self.base_of(image, sidecar)
        return self.outputs.missing(image, changed_ns(image_stat), base, known, lambda: Manifest.read(image.parent))

    def needs_metadata(self, image: Path) -> str | None:
        """The format of ``image`` that needs pyexiv2 (``xmp``, ``embed``), or None."""
        formats = self.outputs.formats
        return "xmp" if "xmp" in formats else "embed" if "embed" in formats and metadata.can_embed(image) else None

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
    """The JSON sidecar of a caption phicapctl got (``outputs.provenance``), with the daemon's
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


def _too_large(image: Path, size: str, max_bytes: int) -> Outcome:
    message = f"{image}: {size} is over the daemon's limit of {max_bytes} bytes ([control] max_body_bytes); not sent"
    return _failed(image, None, IMAGE_TOO_LARGE, message, EX_DATAERR)


def _model_of(result: CaptionResult) -> str:
    """``id@revision`` as the writer records it: the model that made the caption (a remote
    server's own), else the daemon's identity."""
    given = result.provenance or {}
    model, revision = given.get("model"), given.get("revision")
    if not isinstance(model, str) or not model:
        return result.model
    return f"{model}@{revision}" if isinstance(revision, str) and revision else model


class BatchCaptioner:
    """Caption many files through one client, ``jobs`` requests in flight so the GPU batches them."""

    def __init__(
        self,
        client: ControlClient,
        options: Options,
        fallback: SidecarInfo | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """``fallback``: the global policy, for a daemon without ``/v1/sidecar`` (asked of
        ``/v1/status`` when needed and not given). ``max_bytes``: the largest image the daemon
        takes (its ``max_body_bytes``; None: a daemon that does not say, so its default)."""
        self.client = client
        self.options = options
        self.max_bytes = max_bytes or DEFAULT_MAX_BYTES
        self._fallback = fallback
        self._naming: dict[Path, Naming] = {}
        self._unreachable = threading.Event()
        self._untracked = threading.Event()  # the daemon predates /v1/captioned
        self._lock = threading.Lock()
        # Outside every root: directory -> the captions its metadata.jsonl takes at the end.
        self._manifests: dict[Path, dict[str, str]] = {}

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
        if st.st_size > self.max_bytes:  # refused unread: the daemon would refuse the upload
            return _too_large(image, f"{st.st_size} bytes", self.max_bytes)
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
        if "embed" in naming.outputs.formats and is_raw_name(image.name):
            return _failed(image, sidecar, EMBED_RAW_REFUSED, f"{image}: {EMBED_RAW_MESSAGE}", EX_DATAERR)
        needs = naming.needs_metadata(image)
        if needs is not None:
            try:
                require_pyexiv2()
            except MetadataUnavailable as e:
                # Before the model: a caption that could not be written whole is not asked for.
                message = f"{image}: its {needs} caption {e}"
                return _failed(image, sidecar, "metadata_unavailable", message, EX_UNAVAILABLE)
        if not self.options.force and not naming.missing(image, st, sidecar):
            return Outcome(image, naming.primary(image, sidecar), "skipped")
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
        try:  # it may have changed since ``_plan`` stat'ed it: checked again as it is opened
            data = safe_files.read_bytes(image, self.max_bytes)
        except safe_files.RefusedFile as e:
            if e.code == SIDECAR_TOO_LARGE:
                return _too_large(image, "more bytes", self.max_bytes)
            return _failed(image, sidecar, "input_unreadable", f"{image}: {e.strerror}", EX_NOINPUT)
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
                provenance=sidecar is not None
                and naming is not None
                and ("json" in naming.outputs.formats or naming.tracked),
            )
        except ControlClientError as e:
            return self._client_failed(image, sidecar, e)
        if sidecar is None:
            return Outcome(image, sidecar, "captioned", result=result)
        assert naming is not None
        primary = naming.primary(image, sidecar)
        formats, failed = self._write(image, sidecar, naming, result, data)
        if failed is not None:
            target, e = failed
            return Outcome(
                image,
                primary,
                "failed",
                result=result,
                code=e.code
                if isinstance(e, safe_files.RefusedFile)
                else metadata.unreadable_code(target, e) or "sidecar_unwritable",
                message=f"cannot write {target}: {getattr(e, 'strerror', None) or e}",
                exit_code=EX_CANTCREAT,
            )
        named = sidecar.name if naming.named else None
        warning = self._report(image, key, named, result, data) if naming.tracked else None
        if naming.manifest and "jsonl" in formats:
            with self._lock:
                self._manifests.setdefault(Path(os.path.realpath(image.parent)), {})[image.name] = result.caption
        return Outcome(image, primary, "captioned", result=result, warning=warning)

    def _write(
        self, image: Path, sidecar: Path, naming: Naming, result: CaptionResult, data: bytes
    ) -> tuple[list[OutputFormat], tuple[Path, Exception] | None]:
        """Write the outputs of ``image`` the policy does not keep (``--force``: all); returns the
        formats it is to have from this caption, and the output that failed, with why.

        In the daemon's writer's order (``outputs.plan``): embed, the XMP sidecar, the per-image
        files. The manifest is the caller's (outside every root) or the daemon's (``/v1/captioned``).
        """
        base = naming.base_of(image, sidecar)
        if self.options.force:
            formats = list(naming.outputs.formats)
        else:
            try:
                previous = next((c for c in naming.outputs.held(image, base).values() if c), None)
                formats = naming.missing(image, os.stat(image), sidecar, previous)
            except (OSError, RuntimeError) as e:  # exiv2 raises RuntimeError
                return [], (image, e)
            if not formats:
                # Every output appeared while the image was on the model: ours replaces the
                # files, as phicapctl always did (the caption was asked for).
                formats = list(naming.outputs.files(image, base)) or list(naming.outputs.formats)
        plan = WritePlan.of(naming.outputs, image, base, formats, result.caption, lambda _: _json_text(result, data))
        return formats, plan.write()

    def _report(self, image: Path, key: str, sidecar: str | None, result: CaptionResult, data: bytes) -> str | None:
        """Tell the daemon about the caption just written under a root, so its journal tracks it;
        a warning if it did not record it. A daemon without ``/v1/captioned`` is not asked again."""
        given = result.provenance or {}
        settings_key, prompt, backend = given.get("settings_key"), given.get("prompt"), given.get("backend")
        if self._untracked.is_set() or not isinstance(settings_key, str):
            return None
        try:
            request = CaptionedRequest(
                path=key,
                sidecar=sidecar,
                caption=result.caption,
                sha256=hashlib.sha256(data).hexdigest(),
                model=_model_of(result),
                backend=backend if isinstance(backend, str) else None,
                prompt=prompt if isinstance(prompt, str) else "",
                settings_key=settings_key,
            )
            if self.client.captioned(request) is None:
                self._untracked.set()
        except (ControlClientError, ValidationError) as e:
            detail = e.message if isinstance(e, ControlClientError) else str(e)
            return f"{image}: captioned, but the daemon did not record it, so it may caption it again: {detail}"
        return None

    def _manifests_written(self) -> Iterator[Outcome]:
        """Outside every root: each directory's ``metadata.jsonl`` takes the run's captions, in one
        rewrite by this thread (read-merge-rewrite: the workers must not race on it)."""
        with self._lock:
            manifests, self._manifests = self._manifests, {}
        for directory, captions in sorted(manifests.items()):
            try:
                update_manifest(directory, captions)
            except OSError as e:
                manifest = directory / MANIFEST_NAME
                yield _failed(
                    manifest, None, "sidecar_unwritable", f"cannot write {manifest}: {e.strerror or e}", EX_CANTCREAT
                )

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
        yield from self._manifests_written()
