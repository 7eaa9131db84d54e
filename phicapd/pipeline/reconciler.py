"""Reconcile scans and intake: deciding which images need a caption and recording them.

Events are hints, the scan is the truth. ``Reconciler.scan`` walks a root (or one subtree of
it) and queues every image without an up-to-date sidecar; it runs at start-up (catch-up),
after an inotify overflow, for new subdirectories and on a timer. ``Reconciler.accept`` does
the same check for files the watcher reports settled. Both list each directory once and
commit to the journal in large groups, so a 100,000-file tree costs a few seconds, not a
transaction per file. An image renamed, moved or copied from a captioned one takes that caption
over instead (``pipeline.moves``); only images of a byte size the journal has a caption of are
looked at for that, so a new image costs one indexed query.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

from phicapd.config import Settings, WatchRoot
from phicapd.fsnames import display
from phicapd.log import get_logger
from phicapd.outputs.atomic import remove_stale_temps
from phicapd.outputs.formats.jsonl import Manifest
from phicapd.outputs.freshness import changed_ns
from phicapd.outputs.naming import Claims, SiblingIndex, sidecar_may_exist
from phicapd.outputs.root import Known, RootOutputs, sidecar_base
from phicapd.pipeline.journal import Fingerprint, Job, Journal, NewWork, State
from phicapd.pipeline.moves import Moves
from phicapd.pipeline.paths import is_candidate_name, is_watched_dir, list_images
from phicapd.pipeline.unreadable import UnreadableFiles
from phicapd.raw_roots import raws_left_out

log = get_logger(__name__)

_CHUNK = 2000


def fingerprint(st: os.stat_result) -> Fingerprint:
    return Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class ScanReport:
    root: Path
    directory: Path
    reason: str
    images: int
    queued: int
    temps_removed: int
    seconds: float
    deferred: list[Path]


class Reconciler:
    def __init__(self, settings: Settings, store: Journal, identity: Callable[[], str | None] = lambda: None) -> None:
        """``identity``: the model's, once it is loaded (a copy takes a caption only if current)."""
        self.store = store
        self.moves = Moves(settings, store, identity)  # renamed, moved, copied images keep their captions
        self.settings = settings
        self.unreadable = UnreadableFiles()

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self._settings = self.moves.settings = settings

    # -- the one decision ----------------------------------------------------------------------

    def _needing(
        self,
        root: WatchRoot,
        directory: Path,
        names: Iterable[str],
        siblings: Callable[[], SiblingIndex],
        young_after: float | None,
        claims: Claims,
    ) -> tuple[list[NewWork], list[Path], list[tuple[Path, str]], int]:
        """Of the image ``names`` in ``directory``: those that lack an output their root writes
        (``outputs.root``), as work for the model or as a backfill from their journal
        caption; those modified after ``young_after`` (wall clock), which may still be being
        written and must settle first; the sidecars found beside images that hold no claim
        on them yet; and how many took over a caption of the journal, renamed, moved or copied
        (``pipeline.moves``), which need nothing more.

        Claiming a sidecar found on disk makes it its image's for good: a same-stem image that
        arrives later and sorts first then gets the other name instead of this caption.
        ``siblings`` (the directory's naming index) is asked for only when a file that could be
        the sidecar exists; a new image usually has none, so no directory listing is needed.
        """
        outputs = RootOutputs.of(self.settings, root)
        extension = outputs.named_extension
        seen_at = time.time()  # before any sidecar is looked at: a job done after this was not seen
        candidates: list[tuple[Path, os.stat_result, str]] = []
        found: list[tuple[Path, str]] = []
        young: list[Path] = []
        index: SiblingIndex | None = None
        for name in names:
            path = directory / name
            try:
                st = path.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            try:  # one entry that cannot be judged is logged and skipped; the scan goes on
                base = sidecar_base(path)  # missing under either name: stale whichever the rule picks
                if extension is not None and (name in claims.by_image or sidecar_may_exist(path, extension)):
                    index = index or siblings()
                    base = index.base_for(name, claims)
                    sidecar = directory / (base + extension)
                    if name not in claims.by_image and sidecar.exists():
                        owner = _owner_of_found(index, claims, directory, name, base, st, sidecar)
                        found.append((directory / owner, base))
                        claims.add(owner, base)
                        if owner != name:
                            base = index.base_for(name, claims)
                candidates.append((path, st, base))
            except Exception:
                log.exception("cannot check image", path=display(path))
        # The journal is read only where it can change the answer: overwrite asks whose outputs
        # they are, embed whether the bytes are the ones we embedded into, and an image parked
        # unchanged (exiv2 crashed on it, say) is not handed to exiv2 again on every scan.
        records: dict[Path, Job] = {}
        if outputs.policy == "overwrite" or {"embed", "xmp"}.intersection(outputs.formats):
            records = self.store.records([c[0] for c in candidates])
        manifest = cache(partial(Manifest.read, directory))
        lacking: list[tuple[Path, os.stat_result]] = []
        for path, st, base in candidates:
            record = records.get(path)
            if record is not None and record.state is State.FAILED and record.fingerprint == fingerprint(st):
                continue  # parked, and enqueueing would leave it so
            known = Known.of(record if record is not None and record.state is State.DONE else None, fingerprint(st))
            try:
                if outputs.missing(path, changed_ns(st), base, known, manifest):
                    lacking.append((path, st))
            except Exception:
                log.exception("cannot check image's outputs", path=display(path))
        # A renamed, moved or copied image takes its caption from the journal: no model call.
        # (Not one that may still be being written: it is looked at once it settled.)
        settled = [(p, st) for p, st, _ in candidates if young_after is None or st.st_mtime <= young_after]
        adopted = self.moves.adopt(root, settled, {p for p, _ in lacking})
        lacking = [(p, st) for p, st in lacking if p not in adopted]
        if lacking and not records:
            records = self.store.records([p for p, _ in lacking])
        work: list[NewWork] = []
        for path, st in lacking:
            if young_after is not None and st.st_mtime > young_after:
                young.append(path)
                continue
            record = records.get(path)
            backfill = (
                record is not None
                and record.state is State.DONE
                and record.caption is not None
                and record.fingerprint == fingerprint(st)
            )
            work.append(NewWork(path, root.path, fingerprint(st), seen_at=seen_at, backfill=backfill))
        return work, young, found, len(adopted)

    # -- watcher intake ------------------------------------------------------------------------

    def accept(self, settled: Iterable[tuple[Path, WatchRoot]]) -> int:
        """Queue the given settled files if they need a caption; returns how many became pending.

        Settled means unchanged since the last look, whatever the mtime says (a future one
        included): their mtime is not judged again here.
        """
        by_dir: dict[tuple[Path, Path], tuple[WatchRoot, set[str]]] = {}
        for path, root in settled:
            by_dir.setdefault((path.parent, root.path), (root, set()))[1].add(path.name)
        work: list[NewWork] = []
        adopted = 0
        for (directory, _), (root, names) in by_dir.items():
            queued, _, found, took = self._needing(
                root,
                directory,
                sorted(names),
                partial(_listed_index, directory, root),
                None,
                Claims(_claims_for(self.store, directory, names), directory),
            )
            self.store.claim_sidecars(found)
            work.extend(queued)
            adopted += took
        return (_enqueue(self.store, work) if work else 0) + adopted

    # -- scans ---------------------------------------------------------------------------------

    def scan(self, root: WatchRoot, directory: Path | None = None, reason: str = "scan") -> ScanReport:
        """Queue every image below ``directory`` without an up-to-date sidecar.

        Images modified within the settle time, or stamped in the future, may still be being
        written; they are reported as ``deferred`` (intake records them once unchanged for the
        settle time) instead of being queued half-written.
        """
        started = time.monotonic()
        directory = directory or root.path
        young_after = time.time() - self.settings.watcher.settle_seconds
        images = queued = temps = 0
        pending: list[NewWork] = []
        deferred: list[Path] = []
        passed_over = self.unreadable.tally(root, raws_left_out(self.settings, root))
        if directory == root.path:
            self.moves.sweep()  # captions whose image went while nobody watched, for the paths found
        for current, names in _walk(directory, root, passed_over.note):
            temps += remove_stale_temps(current)
            images += len(names)
            claims = self.store.claims_in(current)
            work, young, found, adopted = self._needing(
                root, current, names, partial(SiblingIndex, names), young_after, Claims(claims, current)
            )
            self.store.claim_sidecars(found)
            # Claims of images that are gone bind nothing; drop them so they do not pile up.
            listed = set(names)
            self.store.drop_claims(current, [i for i in claims if i not in listed and not (current / i).exists()])
            pending.extend(work)
            deferred.extend(young)
            queued += adopted  # taken over from the journal: the scheduler writes any output left
            if len(pending) >= _CHUNK:
                queued += _enqueue(self.store, pending)
                pending = []
        if pending:
            queued += _enqueue(self.store, pending)
        if directory == root.path:  # a subtree's count says nothing of the root's
            self.unreadable.record(root.path, passed_over)
        report = ScanReport(root.path, directory, reason, images, queued, temps, time.monotonic() - started, deferred)
        log.info(
            "scan finished",
            root=str(root.path),
            directory=str(directory),
            reason=reason,
            images=images,
            queued=queued,
            deferred=len(deferred),
            temps_removed=temps,
            seconds=round(report.seconds, 3),
        )
        return report


def _enqueue(store: Journal, work: list[NewWork]) -> int:
    """``store.enqueue_many``; if the group fails, each image on its own, so one that cannot be
    recorded (logged with its path) does not drop the others."""
    try:
        return store.enqueue_many(work)
    except Exception:
        if len(work) == 1:
            log.exception("cannot record image", path=display(work[0].path))
            return 0
    return sum(_enqueue(store, [w]) for w in work)


def _owner_of_found(
    index: SiblingIndex, claims: Claims, directory: Path, name: str, base: str, st: os.stat_result, sidecar: Path
) -> str:
    """Whose is an unclaimed sidecar that the rule gives the image ``name``?

    Usually that image's. But when ``name`` is newer than the sidecar and a same-stem image
    without a claim is not, the sidecar was written for that one before ``name`` arrived (while
    the daemon was down, or before phicapd ran): it stays that image's, and ``name`` is named
    around it.
    """
    try:
        written = sidecar.stat().st_mtime_ns
    except OSError:
        return name
    if base != os.path.splitext(name)[0] or st.st_mtime_ns <= written:
        return name
    for other in index.same_stem(base):
        if other == name or other in claims.by_image:
            continue
        try:
            if (directory / other).stat().st_mtime_ns <= written:
                return other
        except OSError:
            continue
    return name


def _claims_for(store: Journal, directory: Path, names: set[str]) -> dict[str, str]:
    """The claims that bear on ``names``: a few files settle at a time in what may be a huge
    directory, so ask for each one's neighbourhood rather than for the whole directory."""
    if len(names) > 32:
        return store.claims_in(directory)
    claims: dict[str, str] = {}
    for name in names:
        claims.update(store.claims_near(directory / name))
    return claims


def _listed_index(directory: Path, root: WatchRoot) -> SiblingIndex:
    return SiblingIndex(list_images(directory, root))


def _walk(
    top: Path, root: WatchRoot, passed_over: Callable[[Path, str], None] | None = None
) -> Iterator[tuple[Path, list[str]]]:
    """Yield (directory, candidate image names) for ``top`` and, if recursive, below it;
    ``passed_over(directory, name)`` is told of every other file (``unreadable`` counts them).

    Symlinked directories are not followed (no loops, no escaping the root), symlinked files
    are captioned like files; unreadable
    directories are logged and skipped.
    """
    stack = [top]
    seen: set[tuple[int, int]] = set()
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as e:
            log.warning("cannot scan directory", directory=display(current), error=display(str(e)))
            continue
        names: list[str] = []
        subdirs: list[Path] = []
        rel = current.relative_to(root.path).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    sub = Path(entry.path)
                    if root.recursive and is_watched_dir(sub, root):
                        subdirs.append(sub)
                elif entry.is_file() and is_candidate_name(entry.name, prefix + entry.name, root):
                    names.append(entry.name)
                elif passed_over is not None and entry.is_file():
                    passed_over(current, entry.name)
            except OSError:
                continue
        names.sort()
        yield current, names
        stack.extend(sorted(subdirs, reverse=True))
