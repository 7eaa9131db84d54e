"""``txt``: ``photo.txt`` beside the image (``[sidecar] extension``), the caption and a newline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from phicapd.outputs import safe_files
from phicapd.outputs.formats import ABSENT, Absent, Existing, Format, Stage, register
from phicapd.outputs.freshness import policy_keeps

if TYPE_CHECKING:
    from phicapd.outputs.root import RootOutputs


class Txt(Format):
    name = "txt"
    primary_rank = 0
    stage = Stage.FILE

    def extension(self, outputs: RootOutputs) -> str | None:
        return outputs.extension

    def path(self, image: Path, base: str, outputs: RootOutputs) -> Path | None:
        return image.with_name(base + outputs.extension)

    def held(self, path: Path) -> str | Absent | None:
        try:
            return safe_files.read_text(path, safe_files.TEXT_MAX_BYTES).rstrip("\n")
        except FileNotFoundError:
            return ABSENT
        except (OSError, UnicodeDecodeError):
            return None

    def text(self, caption: str, document: Callable[[str], str]) -> str:
        return caption

    def kept(self, e: Existing) -> bool:
        return policy_keeps(e.policy, e.changed_ns, e.files[self.name])

    def present(self, e: Existing) -> bool:
        return e.files[self.name].exists()


register(Txt())
