"""Camera placeholders: description texts that firmware writes into every photo it takes.

Many cameras fill EXIF ``ImageDescription`` (and some photo managers IPTC ``Caption-Abstract``)
with a fixed text, or with spaces or NULs padding a fixed-size field. Nobody wrote those about the
photo, so they count as no description: ``existing = "skip"`` captions such an image as if the
field were empty. A text is a placeholder when, trimmed of whitespace and NULs, it is empty or one
of ``CAMERA_PLACEHOLDERS``, compared case-insensitively. The list is short on purpose: a real
caption that happens to be one of these words is unlikely, a missed placeholder only means an
image keeps its field (and gets no caption in it) until the user overwrites.
"""

from __future__ import annotations

#: The fixed texts, upper-cased (seen in the wild; exiftool's and digiKam's bug trackers list them).
CAMERA_PLACEHOLDERS: frozenset[str] = frozenset(
    {
        "OLYMPUS DIGITAL CAMERA",
        "SONY DSC",
        "DCIM",
        "KODAK DIGITAL STILL CAMERA",
        "MINOLTA DIGITAL CAMERA",
        "KONICA MINOLTA DIGITAL CAMERA",
        "SAMSUNG DIGITAL CAMERA",
        "PENTAX DIGITAL CAMERA",
        "DCF 1.0",  # Minolta DiMAGE firmware (exiftool's t/images/Minolta.jpg, tests/data/real)
        "DIGITAL CAMERA",
        "DEFAULT",
        "UNTITLED",
    }
)


def is_placeholder(text: str) -> bool:
    """Whether ``text`` says nothing about the image (blank, padding, or a camera's fixed text)."""
    trimmed = text.strip(" \t\r\n\v\f\0")
    return not trimmed or trimmed.upper() in CAMERA_PLACEHOLDERS
