"""Output formats beyond ``photo.txt``: the JSON sidecar with provenance, the directory's
``metadata.jsonl`` manifest, and the settings key that tells a stale caption.

Everything here is plain data and files; the writer (``pipeline/writer.py``) decides when.

* ``json``: ``photo.json`` (the same base as ``photo.txt``), one object whose top-level keys
  are public API: ``caption``, ``model``, ``revision``, ``backend``, ``prompt``,
  ``generation``, ``image_sha256``, ``phicapd_version``, ``created_at``.
* ``jsonl``: ``metadata.jsonl`` per directory in Hugging Face ``imagefolder`` layout, one
  ``{"file_name": ..., "text": ...}`` line per image of that directory, sorted by file name.
  It is rewritten whole (temp file + rename) once per writer group, so a reader never sees half
  of it, and an image no longer on disk drops out at the directory's next rewrite.
* The settings key: a short hash of what makes a caption (model, revision, prompt, prefix,
  suffix, ``single_line``, generation settings). The journal keeps it per caption; a caption
  whose key differs from its root's current one is stale (``phicapctl stale``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phicapd import __version__
from phicapd.config import MANIFEST_NAME, Settings, WatchRoot
from phicapd.fsnames import is_utf8
from phicapd.pipeline import safe_files
from phicapd.pipeline.sidecar import write_atomic


@dataclass(frozen=True, slots=True)
class Provenance:
    """What made one caption, as the JSON sidecar states it."""

    model: str
    revision: str | None
    backend: str
    prompt: str
    generation: dict[str, Any]


def generation_settings(settings: Settings, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The ``[model]`` settings that change what the model writes (``max_new_tokens``: a
    request's own limit instead of the configured one)."""
    m = settings.model
    out: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or m.max_new_tokens,
        "num_crops": m.num_crops,
        "do_sample": m.do_sample,
        "strip_openers": list(m.strip_openers),
    }
    if m.do_sample:  # unused by greedy decoding: changing them does not make captions stale
        out["temperature"] = m.temperature
        out["top_p"] = m.top_p
    return out


def model_and_revision(identity: str) -> tuple[str, str | None]:
    """``id@revision`` (a backend's identity) -> (id, revision); no ``@``: no revision."""
    model, sep, revision = identity.rpartition("@")
    return (model, revision) if sep and model else (identity, None)


def settings_key(
    settings: Settings,
    root: WatchRoot,
    identity: str,
    *,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """The key of the settings a caption under ``root`` is made with now (see the module doc).

    ``prompt`` and ``max_new_tokens``: what a request (``phicapctl --prompt``) used instead of
    the root's, so its caption is keyed by what really made it, and stale against the root's.
    """
    model, revision = model_and_revision(identity)
    parts = {
        "model": model,
        "revision": revision,
        "prompt": prompt or settings.prompt_for(root),
        "prefix": root.prefix,
        "suffix": root.suffix,
        "generation": generation_settings(settings, max_new_tokens),
    }
    if root.single_line:  # only when on: the keys of every root without it stay as they were
        parts["single_line"] = True
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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


def read_manifest(directory: Path) -> dict[str, str]:
    """``metadata.jsonl`` of ``directory``: file name -> text. Lines that are not an entry (a
    person's edit gone wrong) are dropped at the next rewrite rather than failing it. A manifest
    that is not a regular file or is over ``safe_files.MANIFEST_MAX_BYTES`` raises
    ``safe_files.RefusedFile`` (never a blocked or unbounded read)."""
    entries: dict[str, str] = {}
    try:
        text = safe_files.read_text(directory / MANIFEST_NAME, safe_files.MANIFEST_MAX_BYTES, errors="replace")
    except FileNotFoundError:
        return entries
    lines = text.splitlines()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            name, text = entry.get("file_name"), entry.get("text")
            if isinstance(name, str) and isinstance(text, str):
                entries[name] = text
    return entries


def update_manifest(directory: Path, captions: Mapping[str, str | None]) -> None:
    """Rewrite ``directory``'s ``metadata.jsonl`` with ``captions`` (file name -> text; None
    removes the entry) merged in, and every entry whose image is gone dropped.

    The writer thread and the moves (``pipeline.moves``) call this; one lock makes each
    read-merge-rewrite whole, so neither loses the other's entries. A manifest
    that is not a regular file (a pipe, a link) or is too large is refused, never replaced
    (``safe_files.RefusedFile``).
    """
    with _MANIFEST_LOCK:
        _update_manifest(directory, captions)


_MANIFEST_LOCK = threading.Lock()


def _update_manifest(directory: Path, captions: Mapping[str, str | None]) -> None:
    entries = read_manifest(directory)
    before = dict(entries)
    for name, text in captions.items():
        if text is None:
            entries.pop(name, None)
        else:
            entries[name] = text
    # A name that is not UTF-8 cannot be a JSON text ``file_name``: the writer parks such an
    # image (``name_not_utf8``) rather than fail the manifest of its whole directory.
    kept = {n: t for n, t in entries.items() if is_utf8(n) and os.path.lexists(directory / n)}
    if kept == before and (kept or not (directory / MANIFEST_NAME).exists()):
        return  # nothing to change (a removal of a file the manifest never listed)
    lines = [json.dumps({"file_name": name, "text": kept[name]}, ensure_ascii=False) for name in sorted(kept)]
    write_atomic(directory / MANIFEST_NAME, "".join(line + "\n" for line in lines))
