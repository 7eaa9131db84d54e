"""The writer: finished background captions -> sidecars on disk -> the journal, in groups.

The sidecar is the truth for "done", so the order matters: a group's sidecars are written
atomically first (parallel temp-file fsyncs, renames, one fsync per directory), and only then
is the group recorded in one journal transaction. A crash in between leaves a sidecar whose job
is still open; the job is then recognised as already captioned instead of being captioned twice.

Each image is named with the journal's claims (``outputs.naming.Claims``), and the sidecar
it gets, written or kept, is claimed for it in the group's transaction: a sidecar that is
another image's is never written over. A sidecar that the ``existing`` policy keeps and that
appeared while its image was on the model (phicapctl, a person) is not replaced: the job is
done without it. A group whose journal
transaction fails stays claimed and is written again after a back-off, so a full disk neither
loses it nor sends its images round the model again.

A root may ask for several formats (``[sidecar] formats``: ``photo.txt``, ``photo.json``, the
directory's ``metadata.jsonl``), written in the order of ``outputs.plan`` (the one phicapctl
follows too). All of them come from one caption: when an image gets more
than one file, its caption is first *staged* in the journal (one transaction for the group),
then every file is written, then the group is recorded as done. A crash in between leaves a
staged job, which the scheduler hands straight back here with the journal's caption
(``Finished.staged``) instead of to the model. Each output is judged by the root's ``existing``
policy on its own (``outputs.root``), so a kept ``photo.txt`` does not stop a missing
``photo.json``. A *backfill* (an image that lacks outputs its journal caption can supply: a
format added to the root, a deleted sidecar, an image renamed or copied from a captioned one:
``pipeline.moves``) comes the same way and writes only what is missing.

An image that its owner replaces, rewrites or deletes while its caption is written is left as
they made it (``metadata``'s identity checks): nothing is recorded done, the job is retried
(``image_changed``, no attempt counted), so its new bytes are captioned, and a deleted image is
forgotten when its turn comes. The XMP sidecar fails alone: one exiv2 cannot parse
(``xmp_unreadable``, parked), one a person edited meanwhile (``xmp_changed``, retried), or any
other failure to merge into it leaves the image's other outputs written and their caption
recorded (``Failure.written``), so the image is not sent to the model again for it.

An output that stands on disk as something other than a regular file (a symbolic link, a named
pipe, a device: ``outputs.safe_files``), or is over its kind's size cap, is never followed,
read or replaced: the image's other outputs are written, and the image is parked with the
refusal's code (``sidecar_not_regular``, ``sidecar_too_large``) naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phicapd.caption_form import one_line, root_form
from phicapd.captioner import Caption
from phicapd.config import Settings, WatchRoot
from phicapd.errors import IMAGE_CHANGED, NAME_NOT_UTF8, XMP_CHANGED, PhicapError
from phicapd.fsnames import display, is_utf8
from phicapd.log import get_logger
from phicapd.outputs import metadata
from phicapd.outputs.atomic import write_sidecars
from phicapd.outputs.formats.json import json_sidecar_text
from phicapd.outputs.formats.jsonl import update_manifest
from phicapd.outputs.naming import Claims, SiblingCache
from phicapd.outputs.plan import WritePlan
from phicapd.outputs.provenance import Provenance, generation_settings, model_and_revision, settings_key
from phicapd.outputs.recheck import Recheck
from phicapd.outputs.root import RootOutputs, sidecar_base
from phicapd.outputs.safe_files import RefusedFile
from phicapd.pipeline.decode import Decoded, fingerprint_of
from phicapd.pipeline.journal import Failure, Fingerprint, Job, Journal, Success

log = get_logger(__name__)

#: Sidecar writes in flight at once. Each one waits on its own fsync (without the GIL), and the
#: filesystem commits concurrent fsyncs together: on ext4, 16 in flight wrote a group's sidecars
#: about twice as fast as 4.
IO_THREADS = 16
#: Back-off of a group whose journal write failed: doubling from the first to the last.
RETRY_SECONDS = (1.0, 60.0)
#: Failures that are no fault of the image's: someone changed a file while we wrote it.
UNCOUNTED = frozenset({IMAGE_CHANGED, XMP_CHANGED})


@dataclass(slots=True)
class Finished:
    """A background job back from the model, or one that failed before it got there."""

    job: Job
    root: WatchRoot | None
    decoded: Decoded | None
    prompt: str
    accepted: float
    batch_size: int = 0
    caption: Caption | None = None
    error: PhicapError | None = None
    skipped: bool = False  # its sidecar is kept as it is (the policy): done without a caption
    claim: str | None = None  # the sidecar base named for it (``outputs.naming.Claims``)
    staged: bool = False  # ``caption`` is the journal's staged text (in its root's form): finish its files


@dataclass(slots=True)
class _Plan:
    """What the writer does for one image of a group."""

    finished: Finished
    record: Success  # what the journal gets once every file is in place
    out: WritePlan  # its outputs, in the order they are written (``outputs.plan``)
    refused: RefusedFile | None = None  # an output that is not a file to replace (``safe_files``)
    xmp_error: PhicapError | None = None  # the XMP sidecar failed: the other outputs go on


class SidecarWriter:
    """One thread that drains finished jobs; ``on_recorded`` hears which job ids are settled."""

    def __init__(
        self,
        settings: Settings,
        store: Journal,
        model_identity: str,
        list_images: Callable[[Path, WatchRoot], list[str]],
        on_recorded: Callable[[list[int], int], None],
        on_taken: Callable[[], None] | None = None,
    ) -> None:
        """``on_taken``: the writer took what was queued (``waiting`` dropped), for back-pressure."""
        self.settings = settings
        self.store = store
        self.model_identity = model_identity
        self.backend = settings.model.backend
        self._on_recorded = on_recorded
        self._on_taken = on_taken
        self._siblings = SiblingCache(list_images)
        self._io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="phicapd-write")
        self._queue: collections.deque[Finished] = collections.deque()
        self._waiting = 0  # captions of the queue fresh from the model (``waiting``)
        self._refresh: set[Path] = set()  # directories whose manifest may list a removed image
        self._merge: dict[Path, dict[str, str]] = {}  # captions phicapctl wrote, for the manifests
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="phicapd-writer", daemon=True)
        self.recent_failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        #: Captions written since start by (backend, endpoint, model), for status.
        self.by_source: collections.Counter[tuple[str, str | None, str]] = collections.Counter()

    def start(self) -> None:
        self._thread.start()

    def submit(self, finished: list[Finished]) -> None:
        with self._cond:
            self._queue.extend(finished)
            self._waiting += sum(1 for f in finished if _fresh(f))
            self._cond.notify()

    @property
    def waiting(self) -> int:
        """Captions made by the model that wait for the writer to take them up. They are only in
        memory (a group taken is first staged in the journal, or its one file per image written),
        so a crash now sends them to the model again: the scheduler keeps this to one batch."""
        with self._cond:
            return self._waiting

    def refresh_manifest(self, directory: Path) -> None:
        """An image of ``directory`` is gone: its ``metadata.jsonl`` drops it at the next turn of
        the writer (which owns the manifests), once for all the removals that arrived by then."""
        with self._cond:
            self._refresh.add(directory)
            self._cond.notify()

    def file_gone(self, path: Path, root: WatchRoot) -> None:
        """The watcher saw ``path`` deleted or moved away: a root that keeps a manifest drops it."""
        current = next((r for r in self.settings.watch if r.path == root.path), root)  # as reloaded
        if "jsonl" in self.settings.formats_for(current):
            self.refresh_manifest(path.parent)

    def merge_manifest(self, directory: Path, captions: dict[str, str]) -> None:
        """``captions`` (image name -> text) were written by someone else (phicapctl, which must
        not rewrite a manifest the writer owns): ``directory``'s ``metadata.jsonl`` takes them in
        at the next turn of the writer."""
        with self._cond:
            self._merge.setdefault(directory, {}).update(captions)
            self._cond.notify()

    def _refresh_manifests(self, directories: set[Path], merge: dict[Path, dict[str, str]]) -> None:
        for directory in sorted(directories | merge.keys()):
            try:
                update_manifest(directory, dict(merge.get(directory, {})))
            except OSError as e:  # the next write or removal in the directory tries again
                log.warning("cannot update the manifest", directory=str(directory), error=str(e))

    def stop(self, timeout: float) -> None:
        """Write what was submitted (within ``timeout``), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        self._io_pool.shutdown(wait=True)

    def _loop(self) -> None:
        delay = RETRY_SECONDS[0]
        while True:
            with self._cond:
                while not self._queue and not self._refresh and not self._merge:
                    if self._closing:
                        return
                    self._cond.wait(0.5)
                group = list(self._queue)
                self._queue.clear()
                self._waiting = 0
                refresh, self._refresh = self._refresh, set()
                merge, self._merge = self._merge, {}
            if group and self._on_taken is not None:
                self._on_taken()
            self._refresh_manifests(refresh, merge)
            if not group:
                continue
            try:
                self._write(group)
                delay = RETRY_SECONDS[0]
            except Exception:
                # The journal is failing (disk full, I/O error). The jobs stay claimed, so the
                # feeder does not hand them to the model again; their sidecars are on disk and
                # rewriting them is cheap. Stopping gives up: the next start recovers them.
                log.exception("cannot record a group of jobs; trying again", jobs=len(group), seconds=delay)
                with self._cond:
                    if self._closing:
                        return
                    self._queue.extendleft(reversed(group))
                    self._waiting += sum(1 for f in group if _fresh(f))
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_SECONDS[1])

    def _write(self, group: list[Finished]) -> None:
        written = self._write_outputs(group)
        successes: list[Success] = []
        failures: list[Failure] = []
        skipped: list[int] = []
        for f in group:
            if f.skipped:
                f.error = None  # a write that failed on an earlier try made it after all
                skipped.append(f.job.id)
            elif id(f) in written and f.error is None:
                successes.append(written[id(f)])
            else:
                # With ``written``, one output failed and the others hold the caption.
                f.error = f.error or PhicapError(f"{f.job.path}: no caption", code="caption_failed")
                failures.append(
                    Failure(
                        f.job.id,
                        f.error.code,
                        str(f.error),
                        f.error.retryable,
                        written=written.get(id(f)),
                        counted=f.error.code not in UNCOUNTED,
                    )
                )
        claims = [(f.job.path, f.claim) for f in group if f.claim is not None and (f.skipped or id(f) in written)]
        parked = {j.id for j in self.store.finish_many(successes, failures, skipped, claims)}
        # Captions made now; a staged one (a backfill, a write finished after a crash) was made before.
        made = [written[id(f)] for f in group if id(f) in written and not f.staged]
        self.by_source.update((s.backend or "", s.endpoint, s.model) for s in made)
        self._on_recorded([f.job.id for f in group], len(made))
        _log(group, parked, self.recent_failures)

    def _plan(self, f: Finished) -> _Plan | None:
        """The outputs ``f`` gets, or None when it gets none (an error, or every output kept)."""
        if f.error is not None or f.caption is None or f.root is None or f.decoded is None:
            return None
        if fingerprint_of(f.job.path) != f.decoded.fingerprint:
            f.error = PhicapError(
                f"{f.job.path}: the image changed while it was captioned", code=IMAGE_CHANGED, retryable=True
            )
            return None
        outputs = RootOutputs.of(self.settings, f.root)
        directory = f.job.path.parent
        base = sidecar_base(f.job.path)
        if outputs.named_extension is not None:  # per-image files: named by the rule and the claims
            claims = Claims(self.store.claims_near(f.job.path), directory)
            base = self._siblings.get(directory, f.root).base_for(f.job.path.name, claims)
            f.claim = base
        caption = f.caption
        # A re-form: the journal's caption (prefix and suffix in it) put on one line (``caption_form``).
        reform = f.staged and f.job.backfill and f.job.force
        text = (one_line(caption.text) if reform else caption.text) if f.staged else root_form(caption.text, f.root)
        model = caption.model or self.model_identity
        key = (
            f.job.settings_key if f.staged and not reform else settings_key(self.settings, f.root, self.model_identity)
        )
        record = Success(
            f.job.id,
            f.decoded.sha256,
            model,
            f.prompt,
            str(outputs.primary(f.job.path, base)),
            f.decoded.fingerprint,
            backend=caption.backend or self.backend,
            endpoint=caption.endpoint,
            caption=text,
            settings_key=key,
            formats=outputs.formats,
        )
        formats = self._recheck(f).formats(outputs, base)
        if not formats:
            # Every output is one the policy keeps: it appeared while the image was on its way.
            f.skipped = True
            return None

        def document(caption: str) -> str:
            name, revision = model_and_revision(model)
            provenance = Provenance(name, revision, record.backend or "", f.prompt, generation_settings(self.settings))
            return json_sidecar_text(caption, provenance, record.sha256, time.time())

        return _Plan(f, record, WritePlan.of(outputs, f.job.path, base, formats, text, document))

    def _write_metadata(self, plan: _Plan) -> None:
        """Embed first, then the XMP sidecar (``outputs.plan``), then (the caller) the other
        files. The journal records the image's new fingerprint after an embed, so neither the
        watcher's event for it, the scans nor ``overwrite`` take our own write for a changed
        image. A failed embed fails the image; a failed XMP sidecar only itself
        (``_Plan.xmp_error``)."""
        f = plan.finished
        path = f.job.path
        assert f.decoded is not None
        out = plan.out
        for fmt, target, step in out.metadata_steps():
            try:
                placed = step(f.decoded.fingerprint)
            except RefusedFile as e:
                if fmt == "embed":  # a symlinked image: its other outputs are still written
                    plan.refused = e
                    continue
                plan.xmp_error = _refused(path, e)
            except (OSError, RuntimeError) as e:
                if fmt == "embed":
                    f.error = _metadata_error(path, path, e)
                    return
                plan.xmp_error = _metadata_error(path, target, e)
            else:
                if placed is not None:
                    fingerprint = Fingerprint(placed.size, placed.mtime_ns, placed.inode)
                    plan.record = dataclasses.replace(plan.record, fingerprint=fingerprint)
                continue
            if not (out.files or out.manifest or (out.embed and plan.refused is None)):
                f.error = plan.xmp_error  # its only output: nothing else holds the caption

    def _write_outputs(self, group: list[Finished]) -> dict[int, Success]:
        """Write the group's files; returns id(finished) -> its journal record, for those written."""
        plans = [plan for f in group if (plan := self._plan(f)) is not None]
        # More than one file for an image: its caption goes to the journal first, so a crash
        # between the files is finished from there (``Finished.staged``), not captioned again.
        staging = [p.record for p in plans if not p.finished.staged and p.out.outputs > 1]
        self.store.stage_many(staging)
        for p in plans:
            if p.out.embed or p.out.xmp is not None:
                self._write_metadata(p)
        plans = [p for p in plans if p.finished.error is None]
        # only-missing: an existing file wins even if it appears while ours is being written.
        keep = {
            path
            for p in plans
            if not p.finished.job.force and self._policy(p.finished) == "only-missing"
            for path, _ in p.out.files
        }
        directories = {d: self._siblings.unchanged(d) for d in {p.finished.job.path.parent for p in plans}}
        items = [item for p in plans for item in p.out.files]
        errors = iter(write_sidecars(items, self._io_pool, keep) if items else [])
        written: dict[int, Success] = {}
        manifests: dict[Path, dict[str, str | None]] = {}
        for p in plans:
            f = p.finished
            failed: tuple[Path, OSError] | None = None
            placed = 0
            for (path, _), error in zip(p.out.files, errors, strict=False):
                if error is None:
                    placed += 1
                elif isinstance(error, RefusedFile):
                    p.refused = p.refused or error
                elif not (isinstance(error, FileExistsError) and path in keep) and failed is None:
                    failed = (path, error)
            if failed is not None:
                path, error = failed
                f.error = PhicapError(
                    f"{f.job.path}: cannot write its sidecar {path}: {error.strerror or error}",
                    code="sidecar_write_failed",
                    retryable=True,
                )
            elif placed == 0 and p.refused is None and p.out.files and p.out.outputs == len(p.out.files):
                f.skipped = True  # only-missing: every file appeared while ours was being written
            else:
                written[id(f)] = p.record
                if p.refused is not None:  # its other outputs are written (the manifest below too); parked
                    f.error = _refused(f.job.path, p.refused)
                    del written[id(f)]
                elif p.xmp_error is not None:  # recorded as in the other outputs, not in the XMP
                    f.error = p.xmp_error
                    written[id(f)] = _without(p.record, "xmp")
                if p.out.manifest and not is_utf8(f.job.path.name):
                    # metadata.jsonl's file_name is text: this name has no entry (its other outputs
                    # are written) and is parked with a code that says why, until it is renamed.
                    if f.error is None:
                        f.error = PhicapError(
                            f"{display(f.job.path)}: its name is not UTF-8, so metadata.jsonl cannot list it",
                            code=NAME_NOT_UTF8,
                            retryable=False,
                        )
                    if id(f) in written:
                        written[id(f)] = _without(written[id(f)], "jsonl")
                elif p.out.manifest:
                    manifests.setdefault(f.job.path.parent, {})[f.job.path.name] = p.record.caption
        for directory, captions in manifests.items():
            try:
                update_manifest(directory, captions)
            except OSError as e:
                # Its images stay staged in the journal: their retry rewrites the manifest from there.
                for p in plans:
                    if id(p.finished) in written and p.finished.job.path.parent == directory:
                        if p.finished.error is not None:  # failed in part already: that error stands
                            written[id(p.finished)] = _without(written[id(p.finished)], "jsonl")
                            continue
                        del written[id(p.finished)]
                        p.finished.error = (
                            _refused(p.finished.job.path, e)
                            if isinstance(e, RefusedFile)
                            else PhicapError(
                                f"{p.finished.job.path}: cannot write {directory}'s manifest: {e.strerror or e}",
                                code="sidecar_write_failed",
                                retryable=True,
                            )
                        )
        for directory, unchanged in directories.items():
            self._siblings.wrote(directory, unchanged_before=unchanged)
        return written

    def _policy(self, f: Finished) -> str:
        """The root's ``existing`` policy; a backfill adds only what is missing, whatever it is."""
        assert f.root is not None
        return "only-missing" if f.staged and f.job.backfill else self.settings.existing_policy(f.root)

    def _recheck(self, f: Finished) -> Recheck:
        """``f``'s image as the policy judges its outputs now (``outputs.recheck``)."""
        assert f.decoded is not None
        mtime_ns = f.decoded.fingerprint.mtime_ns
        return Recheck(f.job.path, self._policy(f), f.job.force, f.staged, mtime_ns, f.job.caption)


def _without(record: Success, fmt: str) -> Success:
    """``record`` as the journal gets it when the output ``fmt`` failed and the others hold the caption."""
    return dataclasses.replace(record, formats=tuple(f for f in record.formats if f != fmt))


def _refused(image: Path, e: RefusedFile) -> PhicapError:
    """The failure of an image one of whose outputs is not a file to replace (``safe_files``):
    parked, since it will not change by itself; its other outputs are written."""
    return PhicapError(f"{image}: output refused: {e}", code=e.code, retryable=False)


def _metadata_error(image: Path, target: Path, e: OSError | RuntimeError) -> PhicapError:
    """Why ``target``, the image itself or its XMP sidecar, did not get the caption of ``image``."""
    sidecar = target != image
    if isinstance(e, metadata.FileChanged | FileNotFoundError):
        # Someone replaced, edited or removed it meanwhile: theirs stays. An image's new bytes get
        # a caption of their own (a deleted one is forgotten when its turn comes); a sidecar gets
        # ours merged into their version.
        what = f"its XMP sidecar {target}" if sidecar else "the image"
        return PhicapError(
            f"{image}: {what} changed while the caption was written into it; it is left as it is and tried again ({e})",
            code=XMP_CHANGED if sidecar else IMAGE_CHANGED,
            retryable=True,
        )
    unreadable = metadata.unreadable_code(target, e)
    if unreadable is not None:
        what, fix = (
            (f"its XMP sidecar {target}", "fix or remove it") if sidecar else ("its own metadata", "fix or strip it")
        )
        return PhicapError(
            f"{image}: exiv2 cannot read {what} ({e}); it is left as it is, without"
            f" the caption: {fix}, then phicapctl retry",
            code=unreadable,
            retryable=False,
        )
    # exiv2 crashed or hung on the file: it would again, so the job is parked, not retried.
    crashed = isinstance(e, metadata.MetadataCrashed)
    return PhicapError(
        f"{image}: cannot write its caption into {target}: {e}",
        code="metadata_crashed" if crashed else "sidecar_write_failed",
        retryable=not crashed,
    )


def _fresh(f: Finished) -> bool:
    """A caption the model just made (not a failure, a kept sidecar or the journal's own)."""
    return f.caption is not None and not f.staged


def _log(group: list[Finished], parked: set[int], recent_failures: collections.deque[dict[str, Any]]) -> None:
    """One canonical line per finished job; each failure also goes to ``recent_failures`` (status)."""
    now = time.monotonic()
    for f in group:
        fields: dict[str, Any] = {
            "path": str(f.job.path),
            "outcome": "failed" if f.error else "skipped" if f.skipped else "done",
            "duration_ms": round((now - f.accepted) * 1000, 1),
            "batch": f.batch_size,
        }
        if f.staged:
            fields["from_journal"] = "backfill" if f.job.backfill else "staged"
        if f.caption is not None and not f.staged:  # a staged caption's tokens were spent before
            fields["tokens"] = f.caption.new_tokens
            if f.caption.endpoint is not None:
                fields["endpoint"] = f.caption.endpoint
        if f.error is None:
            log.info("job", **fields)
            continue
        was_parked = f.job.id in parked
        recent_failures.append(
            {
                "path": str(f.job.path),
                "code": f.error.code,
                "message": str(f.error),
                "parked": was_parked,
                "at": time.time(),
            }
        )
        log.warning("job", **fields, error=f.error.code, message=str(f.error), parked=was_parked)
