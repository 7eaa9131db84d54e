"""Whether exiv2 may rewrite an image's EXIF block without breaking its maker note.

A maker note is the camera maker's private block inside EXIF (``Exif.Photo.MakerNote``). exiv2
decodes the ones it knows (Canon, Nikon, Olympus, Pentax, Sony, Fujifilm, ...: it then reports
``Exif.MakerNote.Offset``) and, when a write makes the EXIF block move, re-encodes them with
their offsets fixed. A maker note it does not know it copies as opaque bytes; if that note
points into the file by absolute offsets, the copy now points at the wrong bytes. Seen on a
Nintendo 3DS photo (Pillow's ``frozenpond.mpo``): after exiv2 added ``ImageDescription`` the
note's model, time stamp and parallax read back as garbage, and ``exiftool -validate`` says
"Possibly incorrect maker notes offsets".

Adding ``ImageDescription`` grows IFD0, which moves everything after it, so an image whose
maker note is opaque to exiv2 gets its caption in XMP and IPTC only (separate segments; exiv2
then leaves the EXIF bytes as they were). Every tool that reads a description reads XMP
``dc:description``; the EXIF field is the one copy that costs the camera's data.
"""

from __future__ import annotations

from collections.abc import Container

#: Present when the image has a maker note at all (exiv2 lists it, decoded or not).
MAKER_NOTE = "Exif.Photo.MakerNote"
#: Present when exiv2 decoded the maker note, and so can re-encode it where it moves.
DECODED = "Exif.MakerNote.Offset"


def exif_rewritable(exif_keys: Container[str]) -> bool:
    """Whether EXIF with these keys (``pyexiv2.Image.read_exif``) survives exiv2 rewriting it:
    no maker note, or one exiv2 decoded."""
    return MAKER_NOTE not in exif_keys or DECODED in exif_keys
