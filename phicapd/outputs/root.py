"""An image's outputs: where each format of its caption goes, and which of them it already has.

A root writes each caption in its ``formats`` (``[sidecar] formats``, ``[[watch]] formats``), in
any combination. The scans, the watcher's intake and the scheduler all ask one question of an
image: which of those outputs does the root's ``existing`` policy keep as they are? Each output
is judged on its own, by its format's module (``outputs.formats``):

* ``txt``, ``json``: the file beside the image (``photo.txt``, ``photo.json``): ``skip`` keeps it
  while it is at least as new as the image, ``only-missing`` whenever it exists;
* ``xmp``: the XMP sidecar, the same way, and only if it holds a description (darktable and
  digiKam write an XMP sidecar for every image they see);
* ``embed``: the image's own description (XMP ``dc:description`` in any language, EXIF
  ``ImageDescription``, IPTC ``Caption-Abstract``; a camera's placeholder is none): kept, unless
  every one is the caption this daemon embedded and the image changed since (``skip``: then it
  is a caption of other bytes);
* ``jsonl``: the image's entry in its directory's ``metadata.jsonl``: ``skip`` keeps it while the
  manifest is at least as new as the image, ``only-missing`` whenever it is listed.

Under ``overwrite`` an output is kept only when the journal says this daemon captioned the
image's current bytes into its primary output, and the output is there.

What is missing is then made in one of two ways. An image whose journal caption was made from
its current bytes gets the missing outputs from that caption (a *backfill*: a format added to a
root, a deleted sidecar; no model call, and every format keeps holding the same caption), and
so does an image renamed, moved or copied from a captioned one (``pipeline.moves``). Any other
image goes to the model, and all its outputs come from the new caption.

The journal knows which formats each caption was written in (``Job.formats``), so an output
inside the image or a shared manifest need not be read back on every scan: bytes unchanged
since the daemon embedded its caption still hold it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phicapd.config import (
    MANIFEST_NAME,
    ExistingPolicy,
    OutputFormat,
    Settings,
    WatchRoot,
    XmpNaming,
)
from phicapd.config_roots import AVAILABLE_FORMATS
from phicapd.outputs import formats, metadata
from phicapd.outputs.formats.jsonl import Manifest

if TYPE_CHECKING:  # only their fields are read: the journal stays a floor above
    from phicapd.pipeline.journal import Fingerprint, Job

#: Output formats in the order an image's primary output is chosen from (the one ``overwrite``
#: and the journal's ``sidecar`` column name).
PRIMARY_ORDER: tuple[OutputFormat, ...] = formats.in_primary_order(AVAILABLE_FORMATS)


@dataclass(frozen=True, slots=True)
class Known:
    """What the journal says this daemon last wrote for an image."""

    caption: str | None  # its text (None: none recorded)
    current: bool  # made from the image's current bytes
    formats: frozenset[str] | None  # the formats it was written in (None: not recorded)
    sidecar: str | None  # its primary output
    written_at: float  # when it was recorded (wall clock)

    def wrote(self, fmt: OutputFormat) -> bool:
        """Whether the image's current bytes were captioned into ``fmt`` (by the journal)."""
        return self.current and self.formats is not None and fmt in self.formats

    @classmethod
    def of(cls, job: Job | None, fingerprint: Fingerprint | None) -> Known | None:
        if job is None:
            return None
        current = fingerprint is not None and job.fingerprint == fingerprint
        return cls(job.caption, current, job.formats, job.sidecar, job.updated_at)


@dataclass(frozen=True, slots=True)
class RootOutputs:
    """The outputs a root writes per caption, and its policy for ones that exist."""

    formats: tuple[OutputFormat, ...]
    policy: ExistingPolicy
    extension: str  # ``[sidecar] extension``, for ``txt``
    xmp_naming: XmpNaming

    @classmethod
    def of(cls, settings: Settings, root: WatchRoot) -> RootOutputs:
        formats = tuple(f for f in PRIMARY_ORDER if f in settings.formats_for(root))
        return cls(formats, settings.existing_policy(root), settings.sidecar.extension, settings.xmp_naming_for(root))

    @property
    def named_extension(self) -> str | None:
        """The extension of the per-image file whose name the naming rule picks (the sidecar base
        for every per-image file), if the root writes one."""
        return next((x for f in self.formats if (x := formats.get(f).extension(self)) is not None), None)

    def files(self, image: Path, base: str) -> dict[OutputFormat, Path]:
        """The per-image files of ``image`` whose sidecar base is ``base``, by format."""
        out: dict[OutputFormat, Path] = {}
        for fmt in self.formats:
            path = formats.get(fmt).path(image, base, self)
            if path is not None:
                out[fmt] = path
        return out

    def held(self, image: Path, base: str) -> dict[OutputFormat, str | None]:
        """The caption each per-image output of ``image`` holds, for the outputs that are there:
        None for a file that exists but holds none (unreadable, not JSON of ours, not a regular
        file, over its cap: ``safe_files``, so a pipe or a device is never read). An XMP sidecar
        without a description counts as not there (other tools write one for every image)."""
        out: dict[OutputFormat, str | None] = {}
        for fmt, path in self.files(image, base).items():
            caption = formats.get(fmt).held(path)
            if not isinstance(caption, formats.Absent):
                out[fmt] = caption
        return out

    def embedded(self, image: Path) -> str | None:
        """The description in the image itself, where the root embeds captions (the first of
        ``embedded_all``)."""
        return next(iter(self.embedded_all(image)), None)

    def embedded_all(self, image: Path) -> tuple[str, ...]:
        """Every description in the image itself (XMP, EXIF, IPTC), where the root embeds captions."""
        if "embed" not in self.formats or not metadata.can_embed(image):
            return ()
        return metadata.read_descriptions(image)

    def holds(self, image: Path, base: str, caption: str) -> bool:
        """Whether a per-image output of ``image`` or its own description holds ``caption``
        (the manifest is not asked)."""
        caption = caption.rstrip("\n")
        return caption in self.held(image, base).values() or caption in self.embedded_all(image)

    def base_of(self, image: Path, primary: Path) -> str:
        """The sidecar base the journal's primary output ``primary`` was written under."""
        extension = self.named_extension
        if extension is None or primary == image or not primary.name.endswith(extension):
            return sidecar_base(image)
        if extension == metadata.XMP_EXTENSION and self.xmp_naming == "full":
            return sidecar_base(image)  # photo.jpg.xmp says nothing of the base
        return primary.name[: -len(extension)]

    def primary(self, image: Path, base: str) -> Path:
        """The output the journal's ``sidecar`` names for the image: its first per-image file,
        else the image itself (``embed``), else the manifest."""
        files = self.files(image, base)
        if files:
            return next(iter(files.values()))
        return image if "embed" in self.formats else image.with_name(MANIFEST_NAME)

    def missing(
        self,
        image: Path,
        changed_ns: int,
        base: str,
        known: Known | None,
        manifest: Callable[[], Manifest],
    ) -> list[OutputFormat]:
        """The formats whose output the policy does not keep (see the module docstring).

        ``changed_ns``: when the image last changed (``freshness.changed_ns``); ``known``: the
        journal's record of it, if any; ``manifest``: its directory's, read when first needed.
        """
        e = formats.Existing(image, self.policy, changed_ns, self.files(image, base), known, manifest)
        if self.policy == "overwrite":
            ours = known is not None and known.current and known.sidecar == str(self.primary(image, base))
            if not ours:
                return list(self.formats)
            return [f for f in self.formats if not formats.get(f).present(e)]
        return [f for f in self.formats if not formats.get(f).kept(e)]


def sidecar_base(image: Path) -> str:
    """The base an image without a per-image file is recorded under: its stem."""
    return os.path.splitext(image.name)[0]
