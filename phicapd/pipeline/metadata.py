"""Captions in XMP: an XMP sidecar (``xmp``) and the image's own metadata (``embed``).

Both go through pyexiv2, the Python binding of exiv2 (the library digiKam and darktable use):
it ships as a manylinux wheel with exiv2 inside, so ``pip install`` alone is enough (no OS
package, no external exiftool process per image), and exiv2 rewrites only the metadata
segments of a file, never its pixel data. It is imported only when a root asks for ``xmp`` or
``embed`` (``require``), so a missing one is a start-up error for those roots alone.

Every write is atomic: the file (or the existing sidecar) is copied to a hidden temp file in the
same directory, exiv2 edits the copy, the copy is fsynced and renamed over the original. A
sidecar that exists is *merged*: only ``dc:description`` (x-default) changes; exiv2 keeps every
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
from pathlib import Path
from types import ModuleType
from typing import Any

from phicapd.log import get_logger
from phicapd.pipeline import safe_files
from phicapd.pipeline.exiv2_supervisor import Supervisor, WorkerDied
from phicapd.pipeline.sidecar import fsync_dir, temp_path

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
WORKER_COMMAND: list[str] = [sys.executable, "-m", "phicapd.pipeline.exiv2_worker"]
#: A request the worker has not answered by then is a hang on a hostile file: it is killed.
TIMEOUT_SECONDS = 30.0


class MetadataUnavailable(RuntimeError):
    """pyexiv2 cannot be imported."""


class MetadataCrashed(RuntimeError):
    """exiv2 crashed or hung on a file while writing to it (a broken or hostile file): not worth
    retrying until the file changes."""


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
    raise RuntimeError(message if error == "RuntimeError" else f"{error}: {message}")


def require() -> ModuleType:
    """pyexiv2, or ``MetadataUnavailable`` saying how to get it."""
    try:
        import pyexiv2
    except ImportError as e:  # also a wheel whose bundled exiv2 fails to load
        raise MetadataUnavailable(
            f"needs the pyexiv2 package (pip install 'phicapd[metadata]'), which cannot be imported: {e}"
        ) from None
    return pyexiv2


def xmp_sidecar_path(image: Path, base: str, naming: str) -> Path:
    """``photo.xmp`` (``naming = "stem"``, Lightroom and digiKam; the same base as ``photo.txt``,
    so two same-stem images never share one) or ``photo.jpg.xmp`` (``"full"``, darktable)."""
    return image.with_name((base if naming == "stem" else image.name) + XMP_EXTENSION)


def _edit_copy(source: Path | None, target: Path, edit: Any, initial: bytes = b"", *, max_bytes: int) -> None:
    """Copy ``source`` (or ``initial``) to a temp file beside ``target``, let ``edit(path)`` change
    it, fsync it and rename it over ``target``. ``source`` must be a regular file of at most
    ``max_bytes``, never a link (``safe_files.copy_regular``), and ``target`` may be replaced only
    if it is one or missing (``safe_files.check_replaceable``): else ``safe_files.RefusedFile``."""
    safe_files.check_replaceable(target)  # before exiv2 is asked: a link or a pipe is not ours
    tmp = temp_path(target)
    try:
        if source is not None:
            safe_files.copy_regular(source, tmp, max_bytes)
        else:
            tmp.write_bytes(initial)
            os.chmod(tmp, 0o644)
        edit(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        safe_files.check_replaceable(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


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
    """Set ``dc:description`` in the XMP sidecar ``path``, merged into it if it exists. A link
    (to a file outside the tree, say), a pipe or a device there is refused, never merged:
    ``safe_files.RefusedFile``."""
    source = path if os.path.lexists(path) else None

    def edit(tmp: Path) -> None:
        _modify(tmp, ("xmp",), caption, path)

    _edit_copy(source, path, edit, EMPTY_PACKET.encode(), max_bytes=safe_files.XMP_MAX_BYTES)


def read_description(path: Path) -> str | None:
    """The x-default ``dc:description`` of an XMP sidecar or an image, if it has one (a file that
    is not a regular one or is over its kind's cap has none: the worker never opens it)."""
    try:
        value = _call({"op": "read", "path": str(path), "max_bytes": _max_bytes(path)}, path).get("value")
    except WorkerDied:
        return None  # a file exiv2 dies on holds no description we can read
    return value if isinstance(value, str) and value else None


def can_embed(image: Path) -> bool:
    return image.suffix.lower() in EMBED_KINDS


def embed_caption(image: Path, caption: str) -> None:
    """Write ``caption`` into ``image`` itself (XMP, EXIF and IPTC as its type holds them).
    A symlinked image is refused (``safe_files.RefusedFile``): the rename would replace the
    link with a copy of its target, and its target is not the file the owner put here.

    The file keeps its modification time, as ``exiftool -P`` does: photo libraries sort by it,
    and a caption the policy keeps beside the image (``skip``: one at least as new as the image)
    must not look older than the image because of our own write.
    """
    kinds = EMBED_KINDS[image.suffix.lower()]
    st = image.stat()

    def edit(tmp: Path) -> None:
        _modify(tmp, kinds, caption, image)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))

    _edit_copy(image, image, edit, max_bytes=safe_files.IMAGE_MAX_BYTES)
