"""``json``: ``photo.json`` beside the image (the same base as ``photo.txt``), one object whose
top-level keys are public API: ``caption``, ``model``, ``revision``, ``backend``, ``prompt``,
``generation``, ``image_sha256``, ``phicapd_version``, ``created_at``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from phicapd import __version__
from phicapd.config import JSON_EXTENSION
from phicapd.outputs import safe_files
from phicapd.outputs.formats import ABSENT, Absent, Existing, Format, Stage, register
from phicapd.outputs.freshness import policy_keeps
from phicapd.outputs.provenance import Provenance

if TYPE_CHECKING:
    from phicapd.outputs.root import RootOutputs


def json_sidecar_text(caption: str, provenance: Provenance, image_sha256: str, created_at: float) -> str:
    """The JSON sidecar of one caption (``caption`` as written to ``photo.txt``)."""
    document = {
        "caption": caption,
        "model": provenance.model,
        "revision": provenance.revision,
        "backend": provenance.backend,
        "prompt": provenance.prompt,
        "generation": provenance.generation,
        "image_sha256": image_sha256,
        "phicapd_version": __version__,
        "created_at": dt.datetime.fromtimestamp(created_at, dt.UTC).isoformat(timespec="seconds"),
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def read_json_caption(path: Path) -> str | None:
    """The ``caption`` of a JSON sidecar, or None if it is missing or not one of ours."""
    try:
        document = json.loads(safe_files.read_text(path, safe_files.TEXT_MAX_BYTES))
    except (OSError, ValueError):  # a pipe or a device beside the image is refused, never read
        return None
    caption = document.get("caption") if isinstance(document, dict) else None
    return caption if isinstance(caption, str) else None


class Json(Format):
    name = "json"
    primary_rank = 1
    stage = Stage.FILE

    def extension(self, outputs: RootOutputs) -> str | None:
        return JSON_EXTENSION

    def path(self, image: Path, base: str, outputs: RootOutputs) -> Path | None:
        return image.with_name(base + JSON_EXTENSION)

    def held(self, path: Path) -> str | Absent | None:
        return read_json_caption(path) if path.exists() else ABSENT

    def text(self, caption: str, document: Callable[[str], str]) -> str:
        return document(caption)

    def kept(self, e: Existing) -> bool:
        return policy_keeps(e.policy, e.changed_ns, e.files[self.name])

    def present(self, e: Existing) -> bool:
        return e.files[self.name].exists()


register(Json())
