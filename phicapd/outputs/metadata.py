"""Captions in XMP: an XMP sidecar (``xmp``) and the image's own metadata (``embed``).

Both go through pyexiv2, the Python binding of exiv2 (the library digiKam and darktable use):
it ships as a manylinux wheel with exiv2 inside, so ``pip install`` alone is enough (no OS
package, no external exiftool process per image), and exiv2 rewrites only the metadata
segments of a file, never its pixel data. It is imported only when a root asks for ``xmp`` or
``embed`` (``require``), so a missing one is a start-up error for those roots alone.

Every write is atomic: the file (or the existing sidecar) is copied to a hidden temp file in the
same directory, exiv2 edits the copy, the copy is fsynced and renamed over the original. It is
also atomic with respect to the file's owner, who may replace, rewrite or delete the image (or
edit the sidecar) while we edit our copy: the rename happens only if the file is still the one
that was copied (``FileIdentity``: inode, size, mtime and ctime, checked after the copy and again
just before the rename); otherwise the copy is dropped and ``FileChanged`` raised, so their bytes
always win and a deleted file is never brought back (``_edit_copy`` says what window remains).

An image or sidecar is *described* when any of XMP ``dc:description`` (any language), EXIF
``ImageDescription`` or IPTC ``Caption-Abstract`` holds text other than a camera's placeholder
(``read_descriptions``); the writer and ``outputs`` keep such a description unless it is this
daemon's own last caption (``described_by_others``) or the policy is ``overwrite``.

A sidecar that exists is *merged*: only ``dc:description`` (x-default) changes; exiv2 keeps every
other property (ratings, labels, keywords, darktable's history, Lightroom's develop settings).
It re-serialises the packet, so the layout (whitespace, attribute vs element form) may change,
never the values. Only regular files are copied, read or replaced (``safe_files``): an XMP
sidecar that is a link, a pipe or a device is refused, never followed or merged.

exiv2 itself never runs in the daemon's process: every open, read and edit goes to a worker
process (``exiv2_worker``, supervised by ``exiv2_supervisor``), because exiv2 crashes or loops on
some crafted files. A worker that dies or takes over ``TIMEOUT_SECONDS`` on a file is killed and
replaced: a read then finds no description, a write raises ``MetadataCrashed`` (its temp file
removed), which the writer records as a failure that is not retried.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phicapd.errors import IMAGE_METADATA_UNREADABLE, XMP_UNREADABLE
from phicapd.log import get_logger

# pyexiv2's availability is checked on config's floor; the names stay importable from here.
from phicapd.metadata_library import MetadataUnavailable
from phicapd.outputs import safe_files
from phicapd.outputs.atomic import _link_into_place, fsync_dir, temp_path
from phicapd.outputs.exiv2_supervisor import Supervisor, WorkerDied

if TYPE_CHECKING:  # not imported at run time: the exiv2 worker imports this module, and starts fast
    from phicapd.pipeline.journal import Fingerprint

log = get_logger(__name__)

XMP_EXTENSION = ".xmp"
DESCRIPTION = "Xmp.dc.description"
X_DEFAULT = 'lang="x-default"'
#: What a new sidecar starts from: an empty packet (exiv2 adds the namespaces it needs).
EMPTY_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about=""/>\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
)
#: The image types ``embed`` writes, and the metadata each one holds (exiv2 writes IPTC into a
#: WebP without complaint and drops it: it has nowhere to go).
EMBED_KINDS: dict[str, tuple[str, ...]] = {
    ".jpg": ("xmp", "exif", "iptc"),
    ".jpeg": ("xmp", "exif", "iptc"),
    ".tif": ("xmp", "exif", "iptc"),
    ".tiff": ("xmp", "exif", "iptc"),
    ".png": ("xmp", "exif", "iptc"),
    ".webp": ("xmp", "exif"),
}


#: How the exiv2 worker is started (the tests point it at a worker that crashes on purpose).
WORKER_COMMAND: list[str] = [sys.executable, "-m", "phicapd.outputs.exiv2_worker"]
#: A request the worker has not answered by then is a hang on a hostile file: it is killed.
TIMEOUT_SECONDS = 30.0


class MetadataCrashed(RuntimeError):
    """exiv2 crashed or hung on a file while writing to it (a broken or hostile file): not worth
    retrying until the file changes."""


class MetadataUnreadable(RuntimeError):
    """exiv2 cannot parse the file it is to edit (a malformed XMP sidecar, say): it is left as it
    is, and trying again cannot help until someone fixes or removes it."""


class FileChanged(OSError):
    """The file was replaced, rewritten or deleted while a copy of it was being edited: the copy
    is dropped, the owner's file is left as they made it (or left deleted)."""


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What tells that a path still names the very bytes we read: a replacement changes the inode,
    a write in place the size or mtime, and the ctime too, even where the writer then restores the
    mtime (``cp -p``, ``touch -r``); a deleted file has none (``of`` returns None)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        try:
            st = os.lstat(path)  # a link put in the file's place is not the file
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def matches(self, known: Fingerprint) -> bool:
        """Is this the version of the file the journal's fingerprint ``known`` names?"""
        return (self.inode, self.size, self.mtime_ns) == (known.inode, known.size, known.mtime_ns)


#: Called as ``hook(step, path)`` at each step of an in-place edit of ``path``: "start" (before it
#: is first looked at), "copied" (the copy is made, before it is checked against the file),
#: "edited" (exiv2 changed the copy) and "before_rename" (the copy is fsynced; the last check and
#: the rename follow). Empty in the daemon: the tests change the file at each step.
EDIT_HOOKS: list[Callable[[str, Path], None]] = []


def _step(name: str, path: Path) -> None:
    for hook in EDIT_HOOKS:
        hook(name, path)


_supervisor = Supervisor()
atexit.register(_supervisor.close)


def _call(request: dict[str, Any], name: Path) -> dict[str, Any]:
    """The worker's answer to ``request`` about the file ``name`` (the image or sidecar, not the
    temp copy being edited); ``WorkerDied`` after one warning naming it. An error the worker
    reports is raised as the exception exiv2 raised there."""
    try:
        answer = _supervisor.call(WORKER_COMMAND, request, TIMEOUT_SECONDS)
    except WorkerDied as e:
        log.warning("exiv2 worker died on a file", path=str(name), op=request.get("op"), reason=e.reason)
        raise
    error = answer.get("error")
    if error is None:
        return answer
    message = str(answer.get("message", ""))
    if error == "OSError":
        errno = answer.get("errno")
        if errno is None:
            raise OSError(message)
        raise OSError(errno, answer.get("strerror") or message, answer.get("filename"))
    if error == "MetadataUnavailable":
        raise MetadataUnavailable(message)
    if error == "MetadataUnreadable":
        raise MetadataUnreadable(message)
    raise RuntimeError(message if error == "RuntimeError" else f"{error}: {message}")


def xmp_sidecar_path(image: Path, base: str, naming: str) -> Path:
    """``photo.xmp`` (``naming = "stem"``, what Lightroom and Camera Raw read beside a proprietary raw
    file; the same base as ``photo.txt``, so two same-stem images never share one) or
    ``photo.NEF.xmp`` (``"full"``, digiKam's and darktable's default)."""
    return image.with_name((base if naming == "stem" else image.name) + XMP_EXTENSION)


def _edit_copy(
    source: Path | None,
    target: Path,
    edit: Any,
    initial: bytes = b"",
    *,
    keep_times: bool = False,
    expect: Fingerprint | None = None,
    max_bytes: int,
) -> FileIdentity:
    """Copy ``source`` (or ``initial``) to a temp file beside ``target``, let ``edit(path)`` change
    it, fsync it and rename it over ``target``.

    ``source`` is ``target`` or None (``target`` is new), and it is the owner's file: the copy
    must be of one version of it (its ``FileIdentity`` the same before and after the copy, and
    that of ``expect``, the version the caller read, if given), and the rename happens only if it
    is still that version just before it; otherwise ``FileChanged``, with the temp file removed.
    A new ``target`` is linked into place, which fails if one appeared meanwhile. What remains is
    the window between the last ``stat`` and ``os.replace`` (microseconds, no I/O in between),
    which no rename-based write can close, and a write in place that leaves size, mtime and ctime
    as they were (the same size, within the filesystem's timestamp granularity). ``keep_times``:
    the copy keeps the source's access and modification times. Returns the identity of the file
    put in place (taken from the copy, so a change right after the rename is not taken for ours).

    Only regular files: ``source`` must be one of at most ``max_bytes``, never a link
    (``safe_files.copy_regular``), and ``target`` may be replaced only if it is one or missing
    (``safe_files.check_replaceable``): else ``safe_files.RefusedFile``, before exiv2 is asked.
    """
    safe_files.check_replaceable(target)
    tmp = temp_path(target)
    try:
        before: FileIdentity | None = None
        if source is not None:
            _step("start", source)
            st = safe_files.copy_regular(source, tmp, max_bytes)  # the fstat of what was copied
            before = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if expect is not None and not before.matches(expect):
                raise FileChanged(f"{source} changed before its caption was written into it")
            _step("copied", source)
            if FileIdentity.of(source) != before:
                raise FileChanged(f"{source} changed while it was copied")
        else:
            tmp.write_bytes(initial)
            os.chmod(tmp, 0o644)
        edit(tmp)
        if source is not None and keep_times:
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        _step("edited", target)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            ours = os.fstat(fd)
        finally:
            os.close(fd)
        placed = FileIdentity(ours.st_dev, ours.st_ino, ours.st_size, ours.st_mtime_ns, ours.st_ctime_ns)
        _step("before_rename", target)
        if before is None:
            try:
                _link_into_place(tmp, target)  # removes tmp, whatever happens
            except FileExistsError:
                raise FileChanged(f"{target} was created while ours was being written") from None
        elif FileIdentity.of(target) != before:  # source is target
            raise FileChanged(f"{target} changed or was removed while its caption was written into a copy")
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return placed


def _modify(path: Path, kinds: tuple[str, ...], caption: str, target: Path) -> None:
    """Set ``caption`` in ``path`` (a temp copy of ``target``) through the worker."""
    request = {"op": "modify", "path": str(path), "kinds": list(kinds), "caption": caption}
    try:
        _call({**request, "max_bytes": _max_bytes(target)}, target)
    except WorkerDied as e:
        raise MetadataCrashed(f"exiv2 crashed on {target} ({e.reason})") from None


def _max_bytes(path: Path) -> int:
    """The cap of ``path``'s kind: an XMP sidecar's packet, else an image."""
    return safe_files.XMP_MAX_BYTES if path.suffix.lower() == XMP_EXTENSION else safe_files.IMAGE_MAX_BYTES


def write_xmp_sidecar(path: Path, caption: str) -> None:
    """Set ``dc:description`` in the XMP sidecar ``path``, merged into it if it exists.

    A link (to a file outside the tree, say), a pipe or a device there is refused, never merged
    (``safe_files.RefusedFile``); ``MetadataUnreadable`` when exiv2 cannot parse the existing
    sidecar (it is left untouched); ``FileChanged`` when it was edited, replaced, removed or
    created meanwhile (theirs is kept)."""
    source = path if os.path.lexists(path) else None

    def edit(tmp: Path) -> None:
        _modify(tmp, ("xmp",), caption, path)

    _edit_copy(source, path, edit, EMPTY_PACKET.encode(), max_bytes=safe_files.XMP_MAX_BYTES)


def read_descriptions(path: Path) -> tuple[str, ...]:
    """Every description an XMP sidecar or an image holds, each text once: XMP ``dc:description``
    in any language (x-default first), EXIF ``ImageDescription``, IPTC ``Caption-Abstract``.
    A camera's placeholder ("OLYMPUS DIGITAL CAMERA", blank padding: ``placeholders``) is none;
    a file that is not a regular one or is over its kind's cap has none (the worker never opens
    it), and so has one exiv2 dies on."""
    try:
        values = _call({"op": "read", "path": str(path), "max_bytes": _max_bytes(path)}, path).get("values")
    except WorkerDied:
        return ()
    if not isinstance(values, list):
        return ()
    return tuple(v for v in values if isinstance(v, str) and v)


def read_description(path: Path) -> str | None:
    """The first of ``read_descriptions`` (the x-default ``dc:description`` where there is one)."""
    return next(iter(read_descriptions(path)), None)


def described_by_others(descriptions: tuple[str, ...], ours: str | None) -> bool:
    """Whether ``descriptions`` (``read_descriptions``) hold a text that is not ``ours``, the
    caption this daemon last wrote: someone else's description (a camera's, a person's, a photo
    manager's) in any field, which ``skip`` and ``only-missing`` keep."""
    return any(text != ours for text in descriptions)


def unreadable_code(target: Path, e: BaseException) -> str | None:
    """The failure code of a write into ``target`` that exiv2 refused because it cannot parse
    the file (``MetadataUnreadable``): an XMP sidecar's or an image's own; None for any other."""
    if not isinstance(e, MetadataUnreadable):
        return None
    return XMP_UNREADABLE if target.suffix.lower() == XMP_EXTENSION else IMAGE_METADATA_UNREADABLE


def can_embed(image: Path) -> bool:
    return image.suffix.lower() in EMBED_KINDS


def embed_caption(image: Path, caption: str, expect: Fingerprint | None = None) -> FileIdentity:
    """Write ``caption`` into ``image`` itself (XMP, EXIF and IPTC as its type holds them).
    A symlinked image is refused (``safe_files.RefusedFile``): the rename would replace the
    link with a copy of its target, and its target is not the file the owner put here.

    The file keeps its modification time, as ``exiftool -P`` does: photo libraries sort by it,
    and a caption the policy keeps beside the image (``skip``: one at least as new as the image)
    must not look older than the image because of our own write. ``expect``: the version of the
    image the caption was made from; ``FileChanged`` if it is not that one, or stops being it
    before the edited copy replaces it (the owner's bytes are kept, a deleted image stays so).
    Returns the identity of the image as written.
    """
    kinds = EMBED_KINDS[image.suffix.lower()]
    return _edit_copy(
        image,
        image,
        lambda tmp: _modify(tmp, kinds, caption, image),
        keep_times=True,
        expect=expect,
        max_bytes=safe_files.IMAGE_MAX_BYTES,
    )
