"""``Phi3VConfig`` for ``trust_remote_code`` runtimes (vLLM): transformers' own ``Phi3Config`` (the
language model, LongRoPE included) plus the two vision fields of a ``phi3_v`` config.json,
``img_processor`` and ``embd_layer`` (phi3v.md §1), kept as the plain dicts the file holds."""

from __future__ import annotations

from typing import Any

from transformers import Phi3Config


class Phi3VConfig(Phi3Config):
    model_type = "phi3_v"

    def __init__(
        self, img_processor: dict[str, Any] | None = None, embd_layer: str | dict[str, Any] = "default", **kwargs: Any
    ) -> None:
        self.img_processor = img_processor
        self.embd_layer = embd_layer
        scaling = kwargs.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) in ("su", "longrope"):
            # Microsoft's spelling ("type": "su"): transformers renames it only after deciding
            # which keys a longrope dict needs, and then rejects the dict; give it the native one.
            kwargs["rope_scaling"] = {
                "rope_type": "longrope",
                "short_factor": list(scaling["short_factor"]),
                "long_factor": list(scaling["long_factor"]),
                "original_max_position_embeddings": kwargs.get("original_max_position_embeddings", 4096),
            }
        super().__init__(**kwargs)
