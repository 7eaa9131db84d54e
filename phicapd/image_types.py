"""Which image files a root takes by default, and which are images no installed decoder reads.

The default ``include`` is the types ``imaging`` decodes here: the formats Pillow always has,
plus HEIC/HEIF when pillow-heif is importable (``pip install 'phicapd[heic]'``; iPhone libraries
are mostly HEIC) and AVIF when Pillow has its AVIF plugin (its wheels do since 11.3; pillow-heif
dropped AVIF in 1.0), and camera raw files (CR2, CR3, NEF, ARW, DNG, ORF, RW2, RAF, ...) when
rawpy, LibRaw's binding, is importable (``pip install 'phicapd[raw]'``; ``raw_decode``). The check
looks for the module without importing it:
settings load in phicapctl and in each reload, and ``imaging`` imports the plugin where it
decodes.

An image file of a type outside the default that no installed decoder reads (a camera's raw
file without rawpy, HEIC without pillow-heif, JPEG XL) is not taken and is counted per root instead
(``pipeline.unreadable``), so the user learns why those photos get no caption.
"""

from __future__ import annotations

import importlib.util

#: What Pillow decodes in every install (``imaging``'s allow-list).
BASE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
HEIF_EXTENSIONS: tuple[str, ...] = (".heic", ".heif")
AVIF_EXTENSIONS: tuple[str, ...] = (".avif",)
#: Camera raw files: decoded through LibRaw (``raw_decode``) where rawpy is installed.
RAW_EXTENSIONS: tuple[str, ...] = (
    ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2",
    ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".rwl", ".iiq",
)  # fmt: skip
OTHER_IMAGE_EXTENSIONS: tuple[str, ...] = (".jxl",)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def heif_available() -> bool:
    """Whether pillow-heif can be imported (HEIC and HEIF decode)."""
    return _importable("pillow_heif")


def avif_available() -> bool:
    """Whether Pillow's AVIF decoder is installed (``imaging`` allows AVIF exactly then)."""
    return _importable("PIL._avif")


def raw_available() -> bool:
    """Whether rawpy (LibRaw) can be imported: camera raw files decode."""
    return _importable("rawpy")


def is_raw_name(name: str) -> bool:
    """Whether the file name (or path, or URL) ends in a camera raw extension, in any case."""
    return name.lower().endswith(RAW_EXTENSIONS)


def default_extensions(*, raw: bool = True) -> tuple[str, ...]:
    """The extensions a root's default ``include`` takes (``raw=False``: without raw files, for a
    root that embeds captions, which raw files cannot take: ``raw_roots``)."""
    out = BASE_EXTENSIONS
    if heif_available():
        out += HEIF_EXTENSIONS
    if avif_available():
        out += AVIF_EXTENSIONS
    if raw and raw_available():
        out += RAW_EXTENSIONS
    return out


def unreadable_extensions() -> frozenset[str]:
    """Extensions of image files that no installed decoder reads (lower case, with the dot)."""
    out = set(OTHER_IMAGE_EXTENSIONS)
    if not raw_available():
        out |= set(RAW_EXTENSIONS)
    if not heif_available():
        out |= set(HEIF_EXTENSIONS)
    if not avif_available():
        out |= set(AVIF_EXTENSIONS)
    return frozenset(out)
