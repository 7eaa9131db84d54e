"""Output formats behind one registry (as Pillow's ``register_open``/``register_save``).

Each format is one module here that registers one ``Format`` when imported: it knows its file
(``path``; None for one that is not a per-image file), how to read the caption that file holds
(``held``), how the ``existing`` policy judges it (``kept``; ``present`` under ``overwrite``),
how a whole file of it holds a caption (``text``), and its place in two orders: ``primary_rank``
(the output the journal's ``sidecar`` column names is the first a root writes) and ``stage`` (the
write order, ``outputs.plan``). ``RootOutputs`` and ``WritePlan`` ask the registry, never a
format's name, so a new format is one module plus its name in ``config.OutputFormat``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final

from phicapd.config import ExistingPolicy, OutputFormat

if TYPE_CHECKING:
    from phicapd.outputs.formats.jsonl import Manifest
    from phicapd.outputs.root import Known, RootOutputs


class Stage(enum.IntEnum):
    """When a format is written (``outputs.plan``): embedding changes the image's bytes, so it
    goes first; the directory's manifest, shared by its images, last."""

    IMAGE = 0  # into the image itself
    METADATA_SIDECAR = 1  # merged into a sidecar other tools share
    FILE = 2  # a whole file of ours beside the image, written atomically
    DIRECTORY = 3  # one file for the whole directory


class Absent:
    """``Format.held``: no output of this format is there (``None`` is one that holds none)."""


ABSENT: Final = Absent()


@dataclass(frozen=True, slots=True)
class Existing:
    """One image's outputs as the policy judges them (``RootOutputs.missing``)."""

    image: Path
    policy: ExistingPolicy
    changed_ns: int  # when the image last changed (``freshness.changed_ns``)
    files: Mapping[OutputFormat, Path]  # its per-image files (``RootOutputs.files``)
    known: Known | None  # the journal's record of it
    manifest: Callable[[], Manifest]  # its directory's, read when first needed


class Format:
    """One output format; subclasses set the class attributes and override what applies."""

    name: ClassVar[OutputFormat]
    primary_rank: ClassVar[int]
    stage: ClassVar[Stage]

    def extension(self, outputs: RootOutputs) -> str | None:
        """The extension of its per-image file, named by the naming rule (None: not one)."""
        return None

    def path(self, image: Path, base: str, outputs: RootOutputs) -> Path | None:
        """Its per-image file for ``image`` under the sidecar base ``base`` (None: not one)."""
        return None

    def held(self, path: Path) -> str | Absent | None:
        """The caption its file ``path`` holds: None for one that holds none, ``ABSENT``."""
        return ABSENT

    def text(self, caption: str, document: Callable[[str], str]) -> str:
        """A whole file of it holding ``caption`` (``Stage.FILE``; ``document``: the JSON one)."""
        raise NotImplementedError(f"{self.name} is not written as a whole file")

    def kept(self, e: Existing) -> bool:
        """Whether the policy (``skip``, ``only-missing``) keeps its output as it is."""
        raise NotImplementedError

    def present(self, e: Existing) -> bool:
        """Whether its output exists at all, whatever its age (``overwrite``)."""
        raise NotImplementedError


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` to the registry (a format module calls this once, when imported)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    return _REGISTRY[name]


def is_file(name: str) -> bool:
    """Whether ``name`` is written as a whole file of ours beside the image (``Stage.FILE``)."""
    return get(name).stage == Stage.FILE


def in_primary_order(names: Iterable[str]) -> tuple[OutputFormat, ...]:
    """The registered formats among ``names``, in the order the primary output is chosen in."""
    chosen = {get(n) for n in names if n in _REGISTRY}
    return tuple(f.name for f in sorted(chosen, key=lambda f: f.primary_rank))


def in_write_order(names: Iterable[str]) -> tuple[OutputFormat, ...]:
    """The registered formats among ``names``, in the order they are written (``Stage``)."""
    chosen = {get(n) for n in names if n in _REGISTRY}
    return tuple(f.name for f in sorted(chosen, key=lambda f: (f.stage, f.primary_rank)))


# The built-in formats register themselves (Pillow's ``preinit``): importing the registry is
# enough to have them all.
from phicapd.outputs.formats import embed, json, jsonl, txt, xmp  # noqa: E402, F401
