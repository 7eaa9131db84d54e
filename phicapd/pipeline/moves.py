"""Renames and moves: an image keeps its caption, and its own outputs follow it, with no model call.

The journal knows each caption's image by its bytes (size, mtime, inode; sha256), so a new path
whose bytes are those of a captioned image whose path is gone is that image, renamed or moved:

* live, the watcher pairs a rename (``Moves.moved``; a renamed directory: ``Moves.moved_dir``, its
  outputs come along beside its images and only the journal's rows and claims follow);
* an image that turned up elsewhere (another root, a move the watcher did not pair, a move while
  the daemon was down) is matched when a scan or the watcher's intake finds it (``Moves.adopt``):
  first by the fingerprint a rename keeps, else by its sha256, read only when a caption of its
  byte size exists. Candidates are the journal's rows whose image is gone and the captions of
  images deleted or moved out while the daemon watched (``Moves.gone``, kept in memory).

Its ``.txt``, ``.json`` and ``.xmp`` (hand edits included) take the names its new root gives
it, where that root writes them, and its ``metadata.jsonl`` entry moves with it; whatever the
new root writes and did not come along is written from the journal's caption (a backfill,
through the scheduler's "no model needed" path). A copy (its original still there) is served
the original's caption the same way, when that caption was made with the settings its new root
would use now. Nothing is captioned twice unless asked.

Safety: an output is moved with ``safe_files.rename_noreplace`` (never over a file that stands
there: that is reported as ``move_target_exists`` and both stay), a link is never followed nor
moved, and the steps run files first, manifest next, journal last. A kill at any step leaves
the journal's row on the old path, whose image is gone, so the next scan finds the new path
again and finishes the move from where it stopped, with no model call (``MOVE_HOOKS``
interrupts each step in the tests).

A deleted image (or one moved out of every root): its root's ``on_delete`` says whether its
outputs stay (``"keep"``) or go (``"remove"``: only those still holding phicapd's own unedited
caption; a hand-edited one stays), and its journal row is dropped, so a later, different image
at that path is never taken for captioned.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from phicapd.config import Settings, WatchRoot
from phicapd.errors import MOVE_TARGET_EXISTS, SIDECAR_NOT_REGULAR
from phicapd.fsnames import display, is_utf8
from phicapd.log import get_logger
from phicapd.outputs import safe_files
from phicapd.outputs.atomic import fsync_dir
from phicapd.outputs.formats.jsonl import Manifest, read_manifest, update_manifest
from phicapd.outputs.freshness import changed_ns
from phicapd.outputs.naming import Claims, SiblingIndex
from phicapd.outputs.provenance import settings_key
from phicapd.outputs.root import PRIMARY_ORDER, Known, RootOutputs, sidecar_base
from phicapd.pipeline.journal import Fingerprint, Job, Journal, State
from phicapd.pipeline.journal_moves import Adoption
from phicapd.pipeline.paths import is_candidate, list_images

log = get_logger(__name__)

#: Called with (step, path) before each step of a move: ``"output"`` (one output's rename),
#: ``"manifest"``, ``"journal"``. Tests raise from one to play a ``kill -9`` there.
MOVE_HOOKS: list[Callable[[str, Path], None]] = []
#: Captions of images that went while the daemon watched, kept for a path that turns up with their
#: bytes; the oldest go first (each is also in no journal row any more: see ``Moves.gone``).
MAX_DEPARTED = 10_000


#: The journal's captions of given bytes: by fingerprint, or by sha256.
_Rows = Callable[..., list["_Source"]]


def _step(name: str, path: Path) -> None:
    for hook in MOVE_HOOKS:
        hook(name, path)


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)


def _captioned(job: Job) -> bool:
    return job.state is State.DONE and job.caption is not None and job.sha256 is not None


@dataclass(frozen=True, slots=True)
class _Source:
    """A caption that a new path may take over: its row, the root it was written under, and
    whether its image is known to be gone (else the journal's row is checked against the disk)."""

    job: Job
    root: WatchRoot | None
    gone: bool = False


class _Departed:
    """``_Source``s of images that went, by the size of their bytes, oldest first."""

    def __init__(self) -> None:
        self._by_path: collections.OrderedDict[Path, _Source] = collections.OrderedDict()
        self._by_size: dict[int, set[Path]] = {}

    def add(self, source: _Source) -> None:
        self.take(source.job.path)
        fp = source.job.fingerprint
        if fp is None:
            return
        self._by_path[source.job.path] = source
        self._by_size.setdefault(fp.size, set()).add(source.job.path)
        while len(self._by_path) > MAX_DEPARTED:
            self.take(next(iter(self._by_path)))

    def take(self, path: Path) -> None:
        source = self._by_path.pop(path, None)
        if source is not None and source.job.fingerprint is not None:
            paths = self._by_size.get(source.job.fingerprint.size, set())
            paths.discard(path)
            if not paths:
                self._by_size.pop(source.job.fingerprint.size, None)

    def has_size(self, size: int) -> bool:
        return size in self._by_size  # a dict lookup, safe without the lock

    def of_size(self, size: int) -> list[_Source]:
        return [self._by_path[p] for p in sorted(self._by_size.get(size, ()))]


class Moves:
    """Decides and carries out renames, moves, copies and deletions (see the module docstring).

    One move at a time (a lock): the intake's thread and each root's scan thread call in."""

    def __init__(self, settings: Settings, store: Journal, identity: Callable[[], str | None]) -> None:
        """``identity``: the model's, once it is loaded. A copy takes a caption made with the
        settings its root would use now, which it names (None: copies are captioned as new)."""
        self.settings = settings
        self.store = store
        self._identity = identity
        self._departed = _Departed()
        self._lock = threading.RLock()

    # -- what the watcher saw --------------------------------------------------------------------

    def moved(self, source: Path, target: Path, root: WatchRoot) -> bool:
        """The watcher paired a rename within ``root``; True when the caption followed it."""
        with self._lock:
            job = self.store.get(source)
            if job is None or job.state is State.RUNNING:
                # Nothing of ours; or the model has it, and the writer finds it gone.
                self._unlist(source, root)
                return False
            try:
                st = target.stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode) or not is_candidate(target, root):
                self.gone(source, root)  # moved out of what the root captions
                self._unlist(source, root)
                return False
            if not _captioned(job):
                self.store.forget(source)  # its target is queued as a new image
                self._unlist(source, root)
                return False
            return self._relocate(_Source(job, root, gone=True), target, st, root)

    def moved_dir(self, source: Path, target: Path | None, root: WatchRoot) -> None:
        """A directory was renamed within ``root`` (its images' outputs came along beside them: the
        journal follows), or moved out of it (``target`` None: its images went)."""
        with self._lock:
            if target is not None:
                moved = self.store.move_tree(source, target, root.path)
                log.info("directory moved", source=display(source), target=display(target), jobs=moved)
                return
            for job in self.store.jobs_under(source):
                if _captioned(job):
                    self._departed.add(_Source(job, root, gone=True))
                self.store.forget(job.path)

    def gone(self, path: Path, root: WatchRoot) -> None:
        """``path`` was deleted or moved out of ``root``. Its caption is kept in memory for a path
        that turns up with its bytes (another root), its outputs follow ``on_delete``, and its row
        goes, so a later, different image at ``path`` is never taken for captioned."""
        with self._lock:
            job = self.store.get(path)
            if job is None or job.state is State.RUNNING or os.path.lexists(path):
                return
            if _captioned(job):
                self._departed.add(_Source(job, root, gone=True))
                if root.on_delete == "remove":
                    self._remove_unedited(job, root)
            self.store.forget(path)

    # -- what a scan or the intake found ---------------------------------------------------------

    def sweep(self) -> None:
        """Remember the captions whose image is gone from every root (moved or deleted while the
        daemon was down): a scan then matches them with the paths their bytes turn up at. Their
        rows stay until then."""
        with self._lock:
            for root in self.settings.watch:
                for job in self.store.captioned(root.path):
                    if _captioned(job) and not os.path.lexists(job.path):
                        self._departed.add(_Source(job, root))

    def adopt(self, root: WatchRoot, images: list[tuple[Path, os.stat_result]], lacking: set[Path]) -> set[Path]:
        """Of ``images`` found under ``root`` (those in ``lacking`` miss an output), the ones that
        took over a caption of the journal: renamed or moved, or copies. Their outputs are in place
        or queued as a backfill; they need nothing more."""
        adopted: set[Path] = set()
        # One query for the directory: a new image of a size no caption has is neither.
        sizes = self.store.sizes_captioned(sorted({st.st_size for p, st in images if p in lacking}))
        for path, st in images:
            try:
                if self._adopt_one(root, path, st, path in lacking and st.st_size in sizes):
                    adopted.add(path)
            except Exception:  # this image goes on as a new one; the scan goes on
                log.exception("cannot take over a caption", path=display(path))
        return adopted

    def _adopt_one(self, root: WatchRoot, path: Path, st: os.stat_result, journal: bool) -> bool:
        """``journal``: it lacks an output, and the journal has captions of its size."""
        if not journal and not self._departed.has_size(st.st_size):
            return False  # the usual new image: no caption of its size, nothing read
        with self._lock:
            departed = [s for s in self._departed.of_size(st.st_size) if s.job.path != path]
            if not departed and not journal:
                return False
            own = self.store.get(path)
            mine = own is not None and own.fingerprint == _fingerprint(st)
            if own is not None and mine and (own.state is not State.PENDING or own.staged):
                return False  # its own caption, parked as it is, or already written from one
            roots = {r.path: r for r in self.settings.watch}

            def rows(fingerprint: Fingerprint | None = None, sha256: str | None = None) -> list[_Source]:
                if not journal:
                    return []
                jobs = self.store.captions_of(fingerprint=fingerprint, sha256=sha256)
                return [_Source(j, roots.get(j.root)) for j in jobs if j.path != path]

            match = self._match(path, st, root, departed, rows)
            if match is None:
                return False
            source, moved = match
            return self._relocate(source, path, st, root) if moved else self._copy(source, path, st, root)

    def _match(
        self, path: Path, st: os.stat_result, root: WatchRoot, departed: list[_Source], rows: _Rows
    ) -> tuple[_Source, bool] | None:
        """The caption ``path`` takes over, and whether its image moved (else a copy): the
        fingerprint a rename keeps first, then the bytes (read once)."""
        fp = _fingerprint(st)
        for s in [*departed, *rows(fingerprint=fp)]:
            if s.job.fingerprint == fp and _gone(s):
                return s, True
        try:
            fd, _ = safe_files.open_regular(path, self.settings.imaging.max_file_bytes)
            with os.fdopen(fd, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError:
            return None
        same = [s for s in [*departed, *rows(sha256=digest)] if s.job.sha256 == digest]
        for s in same:
            if _gone(s):
                return s, True
        for s in same:
            if self._current(s.job, root):
                return s, False
        return None

    def _current(self, job: Job, root: WatchRoot) -> bool:
        """Was ``job``'s caption made with the settings ``root`` would use now?"""
        identity = self._identity()
        return identity is not None and job.settings_key == settings_key(self.settings, root, identity)

    # -- carrying it out -------------------------------------------------------------------------

    def _copy(self, source: _Source, path: Path, st: os.stat_result, root: WatchRoot) -> bool:
        """``path`` holds a copy of a captioned image: its outputs are written from that caption."""
        adoption = Adoption(source.job, path, root.path, _fingerprint(st), False, None, (), False, None)
        taken = self.store.adopt(adoption)
        if taken:
            log.info("copy takes its original's caption", path=display(path), original=display(source.job.path))
        return taken

    def _relocate(self, source: _Source, target: Path, st: os.stat_result, root: WatchRoot) -> bool:
        """``source``'s image is now ``target``: its outputs follow, then the journal does."""
        job = source.job
        outputs = RootOutputs.of(self.settings, root)
        base = self._base_for(target, root, outputs)
        placed: set[str] = set()
        old_formats: frozenset[str] = frozenset()
        if source.root is not None:
            old = _as_written(RootOutputs.of(self.settings, source.root), job)
            old_formats = frozenset(old.formats)
            old_base = old.base_of(job.path, Path(job.sidecar)) if job.sidecar else sidecar_base(job.path)
            old_files = old.files(job.path, old_base)
            for fmt, path in outputs.files(target, base).items():
                if fmt in old_files and self._move_output(old_files[fmt], path):
                    placed.add(fmt)
            self._sync({job.path.parent, target.parent})
            if source.root.on_delete == "remove":  # what the new root does not write is left behind
                self._remove_unedited(job, source.root, keep=frozenset(outputs.files(target, base)))
        if "embed" in outputs.formats and "embed" in old_formats and job.fingerprint == _fingerprint(st):
            placed.add("embed")  # the bytes that hold it, renamed
        if self._move_entry(job, target, "jsonl" in old_formats, "jsonl" in outputs.formats):
            placed.add("jsonl")
        formats = tuple(f for f in outputs.formats if f in placed)
        sidecar = str(outputs.primary(target, base))
        known = Known(job.caption, True, frozenset(formats), sidecar, time.time())
        missing = outputs.missing(target, changed_ns(st), base, known, partial(Manifest.read, target.parent))
        claim = base if outputs.named_extension is not None else None
        _step("journal", target)
        adoption = Adoption(job, target, root.path, _fingerprint(st), True, sidecar, formats, not missing, claim)
        taken = self.store.adopt(adoption)
        self._departed.take(job.path)
        log.info(
            "image moved" if taken else "image moved while on the model",
            source=display(job.path),
            target=display(target),
            outputs=list(formats),
            backfill=list(missing),
        )
        return taken

    def _base_for(self, image: Path, root: WatchRoot, outputs: RootOutputs) -> str:
        if outputs.named_extension is None:
            return sidecar_base(image)
        claims = Claims(self.store.claims_near(image), image.parent)
        return SiblingIndex(list_images(image.parent, root)).base_for(image.name, claims)

    def _move_output(self, source: Path, target: Path) -> bool:
        """Give the output ``source`` the name ``target``; True when ``target`` holds it now."""
        if source == target:
            return _regular(target)
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            # Moved before an interruption (or never there): what stands under the new name is it.
            return _regular(target)
        if not stat.S_ISREG(st.st_mode):
            log.warning("output not moved", code=SIDECAR_NOT_REGULAR, output=display(source), reason="not a file")
            return False
        try:
            there = os.lstat(target)
        except FileNotFoundError:
            there = None
        if there is not None:
            if os.path.samestat(st, there):  # both names on one file: a move interrupted mid-way
                os.unlink(source)
                return True
            log.warning("output not moved", code=MOVE_TARGET_EXISTS, output=display(source), target=display(target))
            return False
        _step("output", source)
        try:
            safe_files.rename_noreplace(source, target)
        except FileExistsError:
            log.warning("output not moved", code=MOVE_TARGET_EXISTS, output=display(source), target=display(target))
            return False
        return True

    def _move_entry(self, job: Job, target: Path, listed: bool, lists: bool) -> bool:
        """The image's ``metadata.jsonl`` entry follows it (its text as it stands, edits
        included; the caption where it had none); True when the target's manifest lists it."""
        _step("manifest", target)
        try:
            entries = read_manifest(target.parent) if lists else {}
            text = read_manifest(job.path.parent).get(job.path.name) if listed else None
            changes: dict[str, str | None] = {job.path.name: None} if job.path.parent == target.parent else {}
            if lists and is_utf8(target.name) and target.name not in entries:
                changes[target.name] = text if text is not None else job.caption
            if changes:
                update_manifest(target.parent, changes)
            if listed and job.path.parent != target.parent and job.path.parent.is_dir():
                update_manifest(job.path.parent, {job.path.name: None})
        except OSError as e:  # a backfill writes the entry, or the writer reports the manifest
            log.warning("manifest entry not moved", path=display(target), error=display(str(e)))
            return False
        return lists and is_utf8(target.name)

    def _unlist(self, image: Path, root: WatchRoot) -> None:
        """A renamed image whose caption did not follow it leaves its directory's manifest."""
        if "jsonl" in self.settings.formats_for(root):
            try:
                update_manifest(image.parent, {image.name: None})
            except OSError as e:
                log.warning("cannot update the manifest", directory=display(image.parent), error=display(str(e)))

    def _remove_unedited(self, job: Job, root: WatchRoot, keep: frozenset[Path] = frozenset()) -> None:
        """``on_delete = "remove"``: the outputs of ``job`` that still hold its caption, as written."""
        outputs = _as_written(RootOutputs.of(self.settings, root), job)
        base = outputs.base_of(job.path, Path(job.sidecar)) if job.sidecar else sidecar_base(job.path)
        files = outputs.files(job.path, base)
        caption = (job.caption or "").rstrip("\n")
        for fmt, text in outputs.held(job.path, base).items():
            path = files[fmt]
            if text != caption or path in keep or not _regular(path):
                continue  # edited by hand (or someone else's), or not a file to remove
            try:
                path.unlink()
                log.info("output of a deleted image removed", path=display(path))
            except OSError as e:
                log.warning("cannot remove the output of a deleted image", path=display(path), error=str(e))

    @staticmethod
    def _sync(directories: set[Path]) -> None:
        for directory in directories:
            with contextlib.suppress(OSError):  # gone since, or a filesystem that cannot: they stand
                fsync_dir(directory)


def _gone(source: _Source) -> bool:
    return source.gone or not os.path.lexists(source.job.path)


def _as_written(outputs: RootOutputs, job: Job) -> RootOutputs:
    """``outputs`` narrowed to the formats ``job``'s caption was written in, where the journal knows."""
    if job.formats is None:
        return outputs
    return replace(outputs, formats=tuple(f for f in PRIMARY_ORDER if f in job.formats))


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
