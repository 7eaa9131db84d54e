"""Provenance: what made a caption, as the JSON sidecar states it, and its settings key.

* ``Provenance``: the model, revision, backend, prompt and generation settings of one caption
  (``outputs.formats.json`` writes them beside the caption).
* The settings key: a short hash of what makes a caption (model, revision, prompt, prefix,
  suffix, ``single_line``, generation settings). The journal keeps it per caption; a caption
  whose key differs from its root's current one is stale (``phicapctl stale``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from phicapd.config import Settings, WatchRoot


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
