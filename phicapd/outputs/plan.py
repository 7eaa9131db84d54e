"""The write plan: what one caption becomes on disk for one image, and the order it is written in.

The daemon's writer (``pipeline.writer``) and phicapctl (``control.batch``) both decide which of
an image's outputs to write (each by the root's ``existing`` policy), then build a ``WritePlan``
here and write it in its order, so the two cannot drift:

1. ``embed``: the caption into the image itself. It changes the image's bytes and keeps its
   mtime (``metadata.embed_caption``), so ``skip`` still sees every file written after it as at
   least as new as the image;
2. ``xmp``: the XMP sidecar (merged into one that is there);
3. the whole files beside the image (``txt``, ``json``), written atomically (``outputs.atomic``;
   the writer groups those of many images into one round of fsyncs);
4. the directory's manifest (``jsonl``), once per directory for all of a group's or a run's
   images (``outputs.formats.jsonl.update_manifest``), by its one owner.

A crash between two steps leaves each output either as it was or holding the new caption.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phicapd.config import OutputFormat
from phicapd.outputs import metadata
from phicapd.outputs.atomic import write_sidecars
from phicapd.outputs.formats import get, in_write_order, is_file
from phicapd.outputs.root import RootOutputs

if TYPE_CHECKING:  # only its fields are read: the journal stays a floor above
    from phicapd.pipeline.journal import Fingerprint

#: One write into the image or its XMP sidecar: expected fingerprint -> where the image stands.
MetadataStep = Callable[["Fingerprint | None"], "metadata.FileIdentity | None"]


@dataclass(slots=True)
class WritePlan:
    """The outputs of one image that one caption goes to (those the policy did not keep)."""

    image: Path
    caption: str
    embed: bool = False  # write the caption into the image file itself
    xmp: Path | None = None  # the XMP sidecar to set (merged) ``dc:description`` in
    files: list[tuple[Path, str]] = field(default_factory=list)  # whole files, with their text
    manifest: bool = False  # the directory's metadata.jsonl gets the image's entry

    @classmethod
    def of(
        cls,
        outputs: RootOutputs,
        image: Path,
        base: str,
        chosen: Collection[OutputFormat],
        caption: str,
        document: Callable[[str], str],
    ) -> WritePlan:
        """The plan that writes ``caption`` into ``chosen`` (a subset of ``outputs.formats``);
        ``base``: the image's sidecar base; ``document``: the JSON sidecar of a caption (each
        format's ``text`` says whether it is one)."""
        paths = outputs.files(image, base)
        files = [(paths[f], get(f).text(caption, document)) for f in in_write_order(chosen) if is_file(f)]
        return cls(
            image,
            caption,
            embed="embed" in chosen and metadata.can_embed(image),
            xmp=paths["xmp"] if "xmp" in chosen else None,
            files=files,
            manifest="jsonl" in chosen,
        )

    @property
    def outputs(self) -> int:
        """How many outputs the plan writes (more than one: the writer stages the caption first)."""
        return self.embed + (self.xmp is not None) + len(self.files) + self.manifest

    def metadata_steps(self) -> Iterator[tuple[OutputFormat, Path, MetadataStep]]:
        """Steps 1 and 2, in order: (the format, the file written, the call that writes it). The
        call takes the image's expected fingerprint (``metadata.embed_caption``); the embed
        returns where the image now stands."""
        if self.embed:
            yield "embed", self.image, lambda expect: metadata.embed_caption(self.image, self.caption, expect)
        if self.xmp is not None:
            xmp = self.xmp
            yield "xmp", xmp, lambda expect: metadata.write_xmp_sidecar(xmp, self.caption)

    def write(self) -> tuple[Path, Exception] | None:
        """Steps 1 to 3 for this image alone (phicapctl's way); the first failure stops the rest:
        returns the output that failed, with why. Step 4 is the caller's (once per directory)."""
        for _, target, step in self.metadata_steps():
            try:
                step(None)
            except (OSError, RuntimeError) as e:  # exiv2 raises RuntimeError
                return target, e
        for target, text in self.files:
            (error,) = write_sidecars([(target, text)])
            if error is not None:
                return target, error
        return None
