"""``xmp``: the XMP sidecar (``photo.xmp`` or ``photo.jpg.xmp``: ``xmp_naming``), its
``dc:description`` merged into what other tools keep there (``outputs.metadata``). One without a
description is no caption: darktable and digiKam write an XMP sidecar for every image they see."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from phicapd.outputs import metadata
from phicapd.outputs.formats import ABSENT, Absent, Existing, Format, Stage, register
from phicapd.outputs.freshness import policy_keeps

if TYPE_CHECKING:
    from phicapd.outputs.root import RootOutputs


class Xmp(Format):
    name = "xmp"
    primary_rank = 2
    stage = Stage.METADATA_SIDECAR

    def extension(self, outputs: RootOutputs) -> str | None:
        return metadata.XMP_EXTENSION

    def path(self, image: Path, base: str, outputs: RootOutputs) -> Path | None:
        return metadata.xmp_sidecar_path(image, base, outputs.xmp_naming)

    def held(self, path: Path) -> str | Absent | None:
        if path.exists() and (description := metadata.read_description(path)) is not None:
            return description
        return ABSENT

    def kept(self, e: Existing) -> bool:
        return policy_keeps(e.policy, e.changed_ns, e.files[self.name]) and self.present(e)

    def present(self, e: Existing) -> bool:
        path = e.files[self.name]
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if e.known is not None and e.known.wrote("xmp") and mtime <= e.known.written_at:
            return True  # as we wrote it: no need to parse it again
        return metadata.read_description(path) is not None


register(Xmp())
