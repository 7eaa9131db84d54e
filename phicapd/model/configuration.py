"""Read a Phi-3.5-vision ``config.json`` (Microsoft's ``phi3_v`` layout) into native configs.

The checkpoint's config describes the language model with Phi-3 field names plus two
vision-specific dicts (``embd_layer``, ``img_processor``). It carries no CLIP config: the
reference hard-codes ViT-L/14-336, and so do we unless the file has its own ``vision_config``
(tiny test checkpoints do). Variants the reference supports but Phi-3.5-vision does not use
(other HD orders, non-MLP projectors, CLS features) are rejected instead of half-supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

from phicapd.errors import ConfigError

# The reference's module-level CLIPVisionConfig (openai/clip-vit-large-patch14-336).
VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

# Language-model fields copied from config.json into Phi3Config when present.
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rope_theta",
    "sliding_window",
    "rms_norm_eps",
    "attention_dropout",
    "embd_pdrop",
    "resid_pdrop",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "initializer_range",
)

_EXPECTED_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


@dataclass(frozen=True)
class Phi3VConfig:
    """Everything needed to build the native model."""

    text: Phi3Config
    vision: CLIPVisionConfig
    image_dim_out: int  # CLIP hidden size; the 2x2 merge makes projector input 4x this
    vision_layer: int  # index into CLIP hidden_states (reference default -2)
    num_img_tokens: int  # merged tokens per crop (144 = 12x12)


def _rope_scaling(raw: dict[str, Any], head_dim: int) -> dict[str, Any] | None:
    scaling = raw.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("su", "longrope"):
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (expected 'su')")
    for name in ("short_factor", "long_factor"):
        factors = scaling.get(name)
        if not isinstance(factors, list) or len(factors) != head_dim // 2:
            raise ConfigError(f"config.json: rope_scaling.{name} must be a list of {head_dim // 2} numbers")
    # transformers renames "su" to "longrope" only after it has decided which keys a longrope dict
    # needs, and then rejects Microsoft's dict; give it the native spelling directly.
    out: dict[str, Any] = {
        "rope_type": "longrope",
        "short_factor": list(scaling["short_factor"]),
        "long_factor": list(scaling["long_factor"]),
    }
    # The factor transformers derives itself when it is missing (max / original), after warning on
    # every start that it should be given; the same number, so the same cos/sin.
    longest, original = raw.get("max_position_embeddings"), raw.get("original_max_position_embeddings")
    if isinstance(longest, int) and isinstance(original, int) and original > 0:
        out["factor"] = longest / original
    return out


def _check_embd_layer(raw: dict[str, Any]) -> None:
    embd = raw.get("embd_layer")
    if not isinstance(embd, dict):
        raise ConfigError("config.json: 'embd_layer' is missing; this is not a Phi-3-vision checkpoint")
    for key, want in _EXPECTED_EMBD_LAYER.items():
        if embd.get(key, want) != want:
            raise ConfigError(f"config.json: embd_layer.{key} = {embd[key]!r} is not supported (expected {want!r})")


def _vision_config(raw: dict[str, Any]) -> tuple[CLIPVisionConfig, int, int, int]:
    img = raw.get("img_processor")
    if not isinstance(img, dict):
        raise ConfigError("config.json: 'img_processor' is missing; this is not a Phi-3-vision checkpoint")
    if img.get("name", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"config.json: img_processor.name {img.get('name')!r} is not supported")
    if img.get("type_feature", "patch") != "patch":
        raise ConfigError(f"config.json: img_processor.type_feature {img['type_feature']!r} is not supported")
    values = dict(VIT_L14_336)
    values.update(raw.get("vision_config") or {})
    values.pop("model_type", None)
    vision = CLIPVisionConfig(**values)
    dim_out = int(img.get("image_dim_out", vision.hidden_size))
    if dim_out != vision.hidden_size:
        raise ConfigError(
            f"config.json: img_processor.image_dim_out {dim_out} != vision hidden size {vision.hidden_size}"
        )
    layer = int(img.get("layer_idx", -2))
    grid = vision.image_size // vision.patch_size
    if grid % 2:
        raise ConfigError(f"config.json: CLIP patch grid {grid}x{grid} cannot be merged 2x2")
    num_img_tokens = int(img.get("num_img_tokens", (grid // 2) ** 2))
    if num_img_tokens != (grid // 2) ** 2:
        raise ConfigError(f"config.json: img_processor.num_img_tokens {num_img_tokens} != {(grid // 2) ** 2}")
    return vision, dim_out, layer, num_img_tokens


def parse_config(raw: dict[str, Any]) -> Phi3VConfig:
    """Turn a ``phi3_v`` config.json dict into native configs; raise ``ConfigError`` if unusable."""
    if raw.get("model_type") != "phi3_v":
        raise ConfigError(f"config.json: model_type is {raw.get('model_type')!r}, expected 'phi3_v'")
    _check_embd_layer(raw)
    text_kwargs = {k: raw[k] for k in _TEXT_FIELDS if k in raw}
    heads = int(raw.get("num_attention_heads", 32))
    head_dim = int(raw.get("hidden_size", 3072)) // heads
    text_kwargs["rope_scaling"] = _rope_scaling(raw, head_dim)
    try:
        text = Phi3Config(**text_kwargs)
        vision, dim_out, layer, num_img_tokens = _vision_config(raw)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.json: invalid model configuration: {e}") from None
    if not -vision.num_hidden_layers <= layer < 0:
        raise ConfigError(f"config.json: img_processor.layer_idx {layer} must be negative and within CLIP")
    return Phi3VConfig(
        text=text, vision=vision, image_dim_out=dim_out, vision_layer=layer, num_img_tokens=num_img_tokens
    )


def read_config(model_dir: Path) -> Phi3VConfig:
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; is {model_dir} a Phi-3.5-vision checkpoint?") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return parse_config(raw)
