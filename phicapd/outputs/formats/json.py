"""``json``: ``photo.json`` beside the image (the same base as ``photo.txt``), one object whose
top-level keys are public API: ``caption``, ``model``, ``revision``, ``backend``, ``prompt``,
``generation``, ``image_sha256``, ``phicapd_version``, ``created_at``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from phicapd import __version__
from phicapd.outputs import safe_files
from phicapd.outputs.provenance import Provenance


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
