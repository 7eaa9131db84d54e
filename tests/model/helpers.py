"""Helpers shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from phicapd.config import ModelSettings
from phicapd.model.captioner import Phi3VCaptioner, load_captioner
from phicapd.model.loading import load_model
from phicapd.model.modeling import Phi3VForCausalLM

# Phi-3.5-vision-instruct's config.json (phi3v.md §1); factor values do not matter here.
REAL_CONFIG = {
    "architectures": ["Phi3VForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.5] * 48, "short_factor": [1.1] * 48, "type": "su"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "vocab_size": 32064,
}


def load_tiny(path: Path, attn: str = "eager") -> Phi3VForCausalLM:
    return load_model(path, device=torch.device("cpu"), dtype=torch.float32, attn_implementation=attn)


def make_captioner(path: Path, **settings: object) -> Phi3VCaptioner:
    values = {"path": path, "device": "cpu", "num_crops": 4, "attn_implementation": "eager", **settings}
    return load_captioner(ModelSettings(**values))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A reproducible random RGB image (PIL's effect_noise is not seedable)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())
