"""The writer's last look: which outputs of an image to write now that its caption is made.

The image was queued because an output was missing, but time passed while it was on the model:
phicapctl or a person may have written one meanwhile. Each output is judged again by the policy
(``policy``: the root's ``existing``, or ``only-missing`` for a backfill), and one that is kept
now appeared while the image was on its way, so it is left as it is. A forced job writes all.
The image's mtime is its fingerprint's, which the writer just checked against the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phicapd.config import OutputFormat
from phicapd.outputs import metadata
from phicapd.outputs.formats import is_file
from phicapd.outputs.formats.jsonl import Manifest
from phicapd.outputs.freshness import policy_keeps
from phicapd.outputs.root import RootOutputs


@dataclass(frozen=True, slots=True)
class Recheck:
    """One image as the writer is about to write it."""

    image: Path
    policy: str  # the ``existing`` policy it is judged by
    force: bool  # written whatever is there
    staged: bool  # the journal's caption, staged before (a backfill, a write finished after a crash)
    mtime_ns: int  # the image's, from the fingerprint its caption was made for
    ours: str | None  # the caption the journal last wrote for it

    def formats(self, outputs: RootOutputs, base: str) -> list[OutputFormat]:
        """The formats of ``outputs`` to write (its whole files in their order, then ``xmp``,
        ``embed``, ``jsonl``); empty when the policy keeps every output as it is."""
        paths = outputs.files(self.image, base)
        formats: list[OutputFormat] = [f for f in outputs.formats if is_file(f) and not self.kept(paths[f])]
        if "xmp" in paths and not self._described(paths["xmp"]):
            formats.append("xmp")
        if "embed" in outputs.formats and metadata.can_embed(self.image) and not self._described(self.image):
            formats.append("embed")
        if "jsonl" in outputs.formats and not self._listed():
            formats.append("jsonl")
        return formats

    def kept(self, sidecar: Path) -> bool:
        """Does the policy keep the file ``sidecar`` as it is now?"""
        return not self.force and policy_keeps(self.policy, self.mtime_ns, sidecar)

    def _listed(self) -> bool:
        """Does the policy keep the image's entry in its directory's manifest?"""
        if self.force or self.policy == "overwrite":
            return False
        entries = Manifest.read(self.image.parent)  # parsed once per version of the file
        listed = self.image.name in entries.names
        return listed and (self.policy == "only-missing" or (entries.mtime_ns or 0) >= self.mtime_ns)

    def _described(self, path: Path) -> bool:
        """Does the policy keep the description in ``path`` (a sidecar or the image:
        ``metadata.read_descriptions``)? An XMP file without one is no caption (darktable writes
        a sidecar for every image it sees), nor is a camera's placeholder."""
        if self.force or self.policy == "overwrite":
            return False
        descriptions = metadata.read_descriptions(path)
        if not descriptions:
            return False
        if path == self.image:
            # A description already in the image (EXIF, IPTC or XMP) is someone else's caption (a
            # camera's, a person's), unless every one is the caption we last wrote: that one is
            # replaced with the image's new caption, or, finishing a staged write, it is this
            # very caption, embedded already.
            return True if metadata.described_by_others(descriptions, self.ours) else self.staged
        return self.policy == "only-missing" or policy_keeps(self.policy, self.mtime_ns, path)
