"""``embed``: the caption in the image itself (XMP ``dc:description`` in any language, EXIF
``ImageDescription``, IPTC ``Caption-Abstract``: ``outputs.metadata``; a camera's placeholder is
none). A description there is kept unless every one is the caption this daemon embedded and the
image changed since (``skip``: then it is a caption of other bytes)."""

from __future__ import annotations

from phicapd.outputs import metadata
from phicapd.outputs.formats import Existing, Format, Stage, register


class Embed(Format):
    name = "embed"
    primary_rank = 3
    stage = Stage.IMAGE

    def kept(self, e: Existing) -> bool:
        if not metadata.can_embed(e.image):
            return True  # a type that holds no description: there is nothing to write
        known = e.known
        if known is not None and known.wrote("embed"):
            return True  # the bytes we embedded our caption into, unchanged
        descriptions = metadata.read_descriptions(e.image)
        if not descriptions:
            return False
        ours_of_other_bytes = (
            known is not None and not known.current and not metadata.described_by_others(descriptions, known.caption)
        )
        return e.policy == "only-missing" or not ours_of_other_bytes

    def present(self, e: Existing) -> bool:
        if not metadata.can_embed(e.image):
            return True
        return (e.known is not None and e.known.wrote("embed")) or metadata.read_description(e.image) is not None


register(Embed())
