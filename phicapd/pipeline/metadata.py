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
never the values.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from phicapd.pipeline.sidecar import fsync_dir, temp_path

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


class MetadataUnavailable(RuntimeError):
    """pyexiv2 cannot be imported."""


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


def _edit_copy(source: Path | None, target: Path, edit: Any, initial: bytes = b"") -> None:
    """Copy ``source`` (or ``initial``) to a temp file beside ``target``, let ``edit(path)`` change
    it, fsync it and rename it over ``target``."""
    tmp = temp_path(target)
    try:
        if source is not None:
            shutil.copyfile(source, tmp)
            shutil.copymode(source, tmp)
        else:
            tmp.write_bytes(initial)
            os.chmod(tmp, 0o644)
        edit(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def _modify(path: Path, kinds: tuple[str, ...], caption: str) -> None:
    pyexiv2 = require()
    image = pyexiv2.Image(str(path))
    try:
        if "xmp" in kinds:
            image.modify_xmp({DESCRIPTION: {X_DEFAULT: caption}})
        if "exif" in kinds:
            image.modify_exif({"Exif.Image.ImageDescription": caption})
        if "iptc" in kinds:
            image.modify_iptc({"Iptc.Application2.Caption": caption})
    finally:
        image.close()


def write_xmp_sidecar(path: Path, caption: str) -> None:
    """Set ``dc:description`` in the XMP sidecar ``path``, merged into it if it exists."""
    exists = path.exists()
    _edit_copy(path if exists else None, path, lambda tmp: _modify(tmp, ("xmp",), caption), EMPTY_PACKET.encode())


def read_description(path: Path) -> str | None:
    """The x-default ``dc:description`` of an XMP sidecar or an image, if it has one."""
    pyexiv2 = require()
    try:
        image = pyexiv2.Image(str(path))
    except (OSError, RuntimeError):
        return None
    try:
        value = image.read_xmp().get(DESCRIPTION)
    except RuntimeError:
        return None
    finally:
        image.close()
    if isinstance(value, dict):
        value = value.get(X_DEFAULT) or next(iter(value.values()), None)
    return value if isinstance(value, str) and value else None


def can_embed(image: Path) -> bool:
    return image.suffix.lower() in EMBED_KINDS


def embed_caption(image: Path, caption: str) -> None:
    """Write ``caption`` into ``image`` itself (XMP, EXIF and IPTC as its type holds them).

    The file keeps its modification time, as ``exiftool -P`` does: photo libraries sort by it,
    and a caption the policy keeps beside the image (``skip``: one at least as new as the image)
    must not look older than the image because of our own write.
    """
    kinds = EMBED_KINDS[image.suffix.lower()]
    st = image.stat()

    def edit(tmp: Path) -> None:
        _modify(tmp, kinds, caption)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))

    _edit_copy(image, image, edit)
