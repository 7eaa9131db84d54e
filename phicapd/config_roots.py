"""The configuration's output vocabulary and the ``[[watch]]`` root model.

What a root captions and what it writes: the existing-sidecar policies, the output formats (their
names are public API), the XMP naming, ``on_delete`` and ``restale``, and ``WatchRoot`` with its
validators. ``phicapd.config`` re-exports every name here, and builds ``Settings`` on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from phicapd import image_types

# What every install decodes; a root's default ``include`` adds HEIC/HEIF/AVIF where a decoder
# for them is installed (``image_types.default_extensions``).
DEFAULT_IMAGE_EXTENSIONS = image_types.BASE_EXTENSIONS

# What becomes of a sidecar that already exists ([sidecar] existing, [[watch]] existing):
#   skip          keep it while it is at least as new as its image (an image saved after its
#                 sidecar is captioned again);
#   overwrite     replace any sidecar this daemon did not write for the image's current bytes;
#   only-missing  never replace it, whatever its age: only images without one are captioned.
# phicapctl --force and forced retries caption and replace under every policy.
ExistingPolicy = Literal["skip", "overwrite", "only-missing"]

# What the daemon writes for each caption ([sidecar] formats, [[watch]] formats); the names are
# public API. ``txt``: ``photo.txt``; ``json``: ``photo.json``, the caption with its provenance;
# ``jsonl``: the directory's ``metadata.jsonl`` (Hugging Face imagefolder); ``xmp``: an XMP
# sidecar's dc:description, merged into an existing one; ``embed``: the image's own XMP, EXIF and
# IPTC (opt-in: it rewrites the image file, pixels untouched). xmp and embed need pyexiv2.
OutputFormat = Literal["txt", "xmp", "embed", "json", "jsonl"]
#: The formats this build writes.
AVAILABLE_FORMATS = ("txt", "xmp", "embed", "json", "jsonl")
#: Formats written through pyexiv2 (``outputs.metadata``).
METADATA_FORMATS = ("xmp", "embed")
# The XMP sidecar's name: "stem" (photo.xmp, as Lightroom and Camera Raw read for raw files;
# same-stem images get photo.png.xmp by the .txt naming rule) or "full" (photo.NEF.xmp, as
# digiKam and darktable write by default).
XmpNaming = Literal["stem", "full"]
#: What becomes of an image's outputs when the image is deleted (or moved out of every root):
#: "keep" them, or "remove" those that still hold phicapd's own unedited caption.
OnDelete = Literal["keep", "remove"]
JSON_EXTENSION = ".json"
MANIFEST_NAME = "metadata.jsonl"
# What happens to captions made with other settings than the root's current ones: "manual"
# (listed by `phicapctl stale`, redone by `phicapctl recaption --stale`) or "auto" (redone at
# start and after a reload, as if `recaption --stale` had been run). Hand-edited captions are
# never redone by either.
RestalePolicy = Literal["manual", "auto"]


def check_formats(value: list[OutputFormat] | None) -> list[OutputFormat] | None:
    if value is None:
        return None
    if not value:
        raise ValueError('formats must name at least one format, e.g. ["txt"]')
    seen: set[str] = set()
    for name in value:
        if name in seen:
            raise ValueError(f"format {name!r} is listed twice")
        seen.add(name)
        if name not in AVAILABLE_FORMATS:
            available = ", ".join(AVAILABLE_FORMATS)
            raise ValueError(f"format {name!r} is not available in this phicapd yet (it writes: {available})")
    return value


#: Every configuration table's rules: an unknown key is an error, and so is a wrong value set later.
SECTION_CONFIG = ConfigDict(extra="forbid", validate_assignment=True)


class Section(BaseModel):
    model_config = SECTION_CONFIG


class WatchRoot(Section):
    path: Path
    recursive: bool = True
    prompt: str | None = None
    prefix: str = ""
    suffix: str = ""
    existing: ExistingPolicy | None = None
    include: list[str] = Field(default_factory=lambda: [f"*{e}" for e in image_types.default_extensions()])
    ignore: list[str] = []
    poll: bool | None = None
    formats: list[OutputFormat] | None = None  # None: [sidecar] formats
    restale: RestalePolicy | None = None  # None: [sidecar] restale
    xmp_naming: XmpNaming | None = None  # None: [sidecar] xmp_naming
    single_line: bool = False  # every output of this root holds its caption as one line
    on_delete: OnDelete = "keep"

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[OutputFormat] | None) -> list[OutputFormat] | None:
        return check_formats(value)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError(f"watch path must be absolute, got {str(value)!r}")
        return value
