"""Sidecar files: where a caption goes, whether it is up to date, and writing it atomically.

Naming rule (shared by the daemon and ``phicapctl``; it needs nothing but the directory):

* ``photo.jpg`` -> ``photo.txt`` (the stem, the name without its last extension);
* when several images in one directory share a stem (``photo.jpg``, ``photo.png``), the one
  whose file name sorts first (plain code-point order) keeps ``photo.txt`` and every other one
  uses its full name: ``photo.png.txt``;
* an image whose stem is the full name of another image that uses its full name uses its full
  name too: with ``a.jpg``, ``a.png`` and ``a.png.jpg``, ``a.png`` takes ``a.png.txt``, so
  ``a.png.jpg`` takes ``a.png.jpg.txt`` (and ``a.png.jpg.gif``, if there is one, its full name).

No two images ever map to the same sidecar: two full names differ because the names do; two
plain names would need the same stem, where only the first image is plain; and a plain
``stem.txt`` equal to a full ``other.txt`` would need ``other`` to be the stem, which the last
rule turns into a full name. The last rule changes nothing in a directory where the first two
alone give distinct names.

Names are kept (``Claims``, stored in the journal): once a sidecar is an image's, because we or
phicapctl wrote it or a scan found it beside the image, it stays that image's. The rule above
names only images without a claim, and skips names other images hold: ``photo.png`` captioned
into ``photo.txt``, a later ``photo.jpg`` gets ``photo.jpg.txt`` though it sorts first, so a
caption (perhaps edited by hand) never changes hands.

The sidecar on disk is the truth for "done": it is written to a hidden temp file in the same
directory, fsynced, renamed over the target and the directory is fsynced, so a crash leaves
either the old caption or the new one, never half a file. A target that is not a regular file
(a symbolic link, a named pipe) is refused, not replaced (``pipeline.safe_files``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from phicapd.pipeline.safe_files import check_replaceable

TEMP_MARKER = ".phicapd-"
NAME_MAX = 255  # bytes in one file name (Linux, every common filesystem)
TEMP_SUFFIX = ".tmp"


class Claims:
    """Sidecar names the journal has given to images of one directory: image name -> base.

    A *base* is a sidecar name without the extension (``photo`` for ``photo.txt``), so a changed
    ``[sidecar] extension`` keeps every image's name. A claim binds only while its image exists:
    one listed by the caller's ``SiblingIndex``, or, for an image the listing leaves out (a file
    the root's patterns skip, captioned with phicapctl), one still on disk in ``directory``.
    """

    def __init__(self, by_image: Mapping[str, str] | None = None, directory: Path | None = None) -> None:
        self.by_image: dict[str, str] = dict(by_image or {})
        self.by_base: dict[str, str] = {base: image for image, base in self.by_image.items()}
        self._directory = directory
        self._on_disk: dict[str, bool] = {}

    def add(self, image: str, base: str) -> None:
        self.by_image[image] = base
        self.by_base[base] = image

    def holder(self, base: str, listed: Collection[str]) -> str | None:
        """The image whose claim on ``base`` binds, if any."""
        image = self.by_base.get(base)
        if image is None or image in listed:
            return image
        if self._directory is None:
            return None
        alive = self._on_disk.get(image)
        if alive is None:
            alive = self._on_disk[image] = os.path.lexists(self._directory / image)
        return image if alive else None


NO_CLAIMS = Claims()


class SiblingIndex:
    """The naming rule over one directory listing: which sidecar each image gets.

    Built once per listing (O(n)); each lookup walks only the image's own stem chain. Claims are
    passed per lookup, since the journal's change while a listing stays valid. Without claims the
    result is the plain rule of the module docstring. With claims, an image that has one keeps
    it; every other image takes the rule's name unless a claim holds it, then its full name, then
    the first free ``name.N`` (N = 2, 3, ...), a base no listed image's plain or full name can be.
    An image missing from the listing is named as if it were listed.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._listed = frozenset(names)
        by_stem: dict[str, list[str]] = {}
        for name in self._listed:
            by_stem.setdefault(_stem(name), []).append(name)
        for group in by_stem.values():
            group.sort()
        self._by_stem = by_stem

    def same_stem(self, stem: str) -> Sequence[str]:
        """The listed images whose stem is ``stem``, sorted."""
        return self._by_stem.get(stem, ())

    def sidecar_for(self, image: Path, extension: str = ".txt", claims: Claims = NO_CLAIMS) -> Path:
        return image.with_name(self.base_for(image.name, claims) + extension)

    def base_for(self, name: str, claims: Claims = NO_CLAIMS) -> str:
        """The sidecar base of the image ``name``: its claim, else the rule's name, free of claims."""
        own = claims.by_image.get(name)
        if own is not None:
            return own
        stem = _stem(name)
        if stem != name and self._takes_stem(name, stem, claims):
            return stem
        if self._free(name, name, claims):
            return name
        n = 2
        while True:
            base = f"{name}.{n}"
            if base not in self._listed and base not in self._by_stem and self._free(base, name, claims):
                return base
            n += 1

    def _free(self, base: str, name: str, claims: Claims) -> bool:
        holder = claims.holder(base, self._listed)
        return holder is None or holder == name

    def _takes_stem(self, name: str, stem: str, claims: Claims) -> bool:
        """Whether ``name`` gets the plain base ``stem``: it is free, ``name`` is the first of the
        stem's unclaimed images, and no image named ``stem`` holds it in its full form."""
        if not self._free(stem, name, claims):
            return False
        for other in self._by_stem.get(stem, ()):
            if other >= name:
                break
            if other not in claims.by_image:
                return False
        # The chain rule: an unclaimed image named ``stem`` in its full form holds the base.
        return not (stem in self._listed and stem not in claims.by_image and self.base_for(stem, claims) == stem)


def is_rule_base(name: str, base: str) -> bool:
    """Whether the naming rule can give the image ``name`` the sidecar base ``base``: its stem,
    its full name, or ``name.N`` (N >= 2)."""
    if base in (_stem(name), name):
        return True
    head, _, n = base.rpartition(".")
    return head == name and n.isascii() and n.isdigit() and n[0] != "0" and int(n) >= 2


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


class SiblingCache:
    """The writer's naming index per directory, reused while the directory is unchanged.

    Listing a directory of 100,000 images for every batch would cost more than captioning it on
    a fast GPU. A directory's mtime changes whenever an entry is added, removed or renamed; the
    cached listing stays valid as long as the only such changes were our own sidecar writes.
    """

    def __init__(self, list_images: Callable[[Path, Any], list[str]], size: int = 1024) -> None:
        self._list_images = list_images
        self._size = size
        self._entries: collections.OrderedDict[Path, tuple[int, SiblingIndex]] = collections.OrderedDict()

    def get(self, directory: Path, root: Any) -> SiblingIndex:
        mtime = _mtime_ns(directory)
        cached = self._entries.get(directory)
        if cached is not None and mtime is not None and cached[0] == mtime:
            self._entries.move_to_end(directory)
            return cached[1]
        index = SiblingIndex(self._list_images(directory, root))
        if mtime is not None:
            self._entries[directory] = (mtime, index)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return index

    def unchanged(self, directory: Path) -> bool:
        cached = self._entries.get(directory)
        return cached is not None and cached[0] == _mtime_ns(directory)

    def wrote(self, directory: Path, *, unchanged_before: bool) -> None:
        """We just wrote sidecars (not images) in ``directory``. If nothing else had changed it
        since it was listed, the listing of its images is still right; otherwise forget it."""
        cached = self._entries.get(directory)
        mtime = _mtime_ns(directory)
        if cached is not None and unchanged_before and mtime is not None:
            self._entries[directory] = (mtime, cached[1])
        else:
            self._entries.pop(directory, None)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def sidecar_for(image: Path, siblings: Iterable[str], extension: str = ".txt") -> Path:
    """The sidecar path of ``image``, given the names of the images in its directory.

    ``siblings`` may or may not include ``image`` itself; only names with the same stem matter.
    """
    return SiblingIndex(siblings).sidecar_for(image, extension)


def is_up_to_date(image_stat: os.stat_result, sidecar: Path) -> bool:
    """``skip`` policy: a non-empty sidecar at least as new as its image is kept as it is.

    The sidecar may have been edited by hand, so its content is never judged; an image whose
    bytes changed gets a newer mtime than its sidecar and is captioned again.
    """
    return _newer(changed_ns(image_stat), sidecar)


def changed_ns(image_stat: os.stat_result) -> int:
    """When the image last changed, as ``skip`` compares it with its sidecar's mtime: its mtime,
    unless that is later than its ctime.

    An mtime later than the ctime was set, not earned: ``cp -p``, unzip or a camera with a fast
    clock stamped the file in the future, and a sidecar written after the copy would look older
    than the image for days, captioned again by every scan. The ctime, which nothing can set,
    says when the copy happened. Writing the image raises both, so it is still captioned again.
    """
    return min(image_stat.st_mtime_ns, image_stat.st_ctime_ns)


def _newer(image_mtime_ns: int, sidecar: Path) -> bool:
    try:
        st = sidecar.stat()
    except OSError:
        return False
    return st.st_size > 0 and st.st_mtime_ns >= image_mtime_ns


def policy_keeps(policy: str, image_mtime_ns: int, sidecar: Path) -> bool:
    """Whether the ``existing`` policy keeps ``sidecar`` as it is: ``skip`` while it is up to
    date (``is_up_to_date``; pass ``changed_ns`` of the image's stat where there is one),
    ``only-missing`` whenever it exists, ``overwrite`` never (the reconciler also asks the journal
    whether this daemon wrote it, for ``overwrite``)."""
    if policy == "skip":
        return _newer(image_mtime_ns, sidecar)
    if policy == "only-missing":
        return sidecar.exists()
    return False


def sidecar_may_exist(image: Path, extension: str) -> bool:
    """Whether a file stands under either name the naming rule can give ``image``'s sidecar.

    When neither exists the sidecar is missing whatever the rule picks, which is known without
    listing the directory (the usual case for a new image).
    """
    return os.path.exists(image.with_name(_stem(image.name) + extension)) or os.path.exists(
        image.with_name(image.name + extension)
    )


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARKER in name and name.endswith(TEMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (e.g. certain FUSE mounts) refuse directory fsync
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def temp_path(target: Path) -> Path:
    """A hidden temp name beside ``target`` that the scans and the watcher skip (``is_temp_name``)."""
    tail = os.fsencode(f"{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")
    # A name is at most 255 bytes: the target's part is cut to fit (its bytes, not its
    # characters, so a cut inside a UTF-8 sequence is still a valid name).
    head = os.fsencode(target.name)[: NAME_MAX - 1 - len(tail)]
    return target.parent / os.fsdecode(b"." + head + tail)


def _write_temp(target: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new temp file beside ``target`` and fsync it; returns the temp path."""
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp


def _rename_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` over ``target``, unless what stands there is not a file of ours to replace
    (``safe_files.check_replaceable``: a link, a pipe): then ``RefusedFile``, ours dropped."""
    try:
        check_replaceable(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _link_into_place(tmp: Path, target: Path) -> None:
    """Like ``_rename_into_place``, but an existing ``target`` wins: FileExistsError, ours dropped.

    A hard link is as atomic as a rename and fails instead of replacing. Where the filesystem
    has no hard links, an existence check and a rename leave a window of a few microseconds.
    """
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "the sidecar exists", str(target)) from None
            os.replace(tmp, target)
            return
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    tmp.unlink()


def write_atomic(target: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``target`` so that readers see the old file or the new one, never a mix."""
    _rename_into_place(_write_temp(target, text.encode("utf-8"), mode), target)
    fsync_dir(target.parent)


def _caption_bytes(caption: str) -> bytes:
    """A caption ends with one newline, as text tools expect."""
    return (caption.rstrip("\n") + "\n").encode("utf-8")


def write_sidecar(sidecar: Path, caption: str) -> None:
    """Write one caption atomically (see ``write_sidecars``)."""
    (error,) = write_sidecars([(sidecar, caption)])
    if error is not None:
        raise error


def write_sidecars(
    items: Sequence[tuple[Path, str]], pool: Executor | None = None, keep: Collection[Path] = ()
) -> list[OSError | None]:
    """Write many sidecars atomically; returns, per item, ``None`` or the error that stopped it.

    A target in ``keep`` is not replaced if it exists by the time ours is ready (another writer,
    a person): its error is then a ``FileExistsError``.

    The same protocol as ``write_atomic``, grouped: each file is written to its temp file,
    fsynced and renamed into place as one task in ``pool``, then each directory is fsynced once
    for the whole group instead of once per file. Running the tasks side by side matters more
    than anything else here: fsync releases the GIL, and the filesystem commits concurrent
    fsyncs together (ext4 turns many of them into one journal commit and one cache flush).
    """

    def place(item: tuple[Path, str]) -> OSError | None:
        target, caption = item
        into_place = _link_into_place if target in keep else _rename_into_place
        try:
            into_place(_write_temp(target, _caption_bytes(caption), 0o644), target)
        except OSError as e:
            return e
        return None

    results = _map(place, items, pool)
    directories = sorted({target.parent for (target, _), r in zip(items, results, strict=True) if r is None})
    failed_dirs = {d: e for d, e in zip(directories, _map(_fsync_dir_or_error, directories, pool), strict=True) if e}
    if failed_dirs:
        results = [
            failed_dirs.get(target.parent, r) if r is None else r for (target, _), r in zip(items, results, strict=True)
        ]
    return results


def _fsync_dir_or_error(directory: Path) -> OSError | None:
    try:
        fsync_dir(directory)
    except OSError as e:
        return e
    return None


def _map(fn: Callable[[Any], OSError | None], items: Sequence[Any], pool: Executor | None) -> list[OSError | None]:
    if pool is None or len(items) < 2:
        return [fn(i) for i in items]
    return list(pool.map(fn, items))


def _writer_alive(name: str) -> bool:
    """Temp names carry the writer's pid; a live writer (say phicapctl) keeps its file."""
    try:
        pid = int(name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files that a killed writer left behind in ``directory``; returns how many.

    A temp file of this process or of another live process is in use and is kept.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if is_temp_name(entry.name) and not _writer_alive(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed
