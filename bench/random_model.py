"""Phi-3.5-vision at full size with random weights, built on the device: GPU benchmarks need no download."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phicapd.model.configuration import parse_config
from phicapd.model.loading import _restore_buffers, build_model
from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.testmodel import TINY_CONFIG

# Phi-3.5-vision-instruct's architecture (phi3v.md §1); no vision_config: ViT-L/14-336.
FULL_SIZE = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "pad_token_id": 32000,
    "img_processor": {**TINY_CONFIG["img_processor"], "image_dim_out": 1024},
}


def full_size_random(device: torch.device, dtype: torch.dtype) -> Phi3VForCausalLM:
    """The full architecture with random weights, built directly on the device (no checkpoint)."""
    raw = {k: v for k, v in TINY_CONFIG.items() if k != "vision_config"} | FULL_SIZE
    gen = torch.Generator().manual_seed(0)
    raw["rope_scaling"] = {
        "type": "su",
        "short_factor": (1.0 + torch.rand(48, generator=gen)).tolist(),
        "long_factor": (4.0 + 60.0 * torch.rand(48, generator=gen)).tolist(),
    }
    meta = build_model(parse_config(raw), "sdpa").to(dtype)
    # Keep buffers on meta so that _restore_buffers recreates them (to_empty leaves garbage).
    buffers = {name for name, _ in meta.named_buffers()}
    model = meta.to_empty(device=device)
    for name in buffers:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, attr, torch.empty_like(getattr(module, attr), device="meta"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
                param.fill_(1.0)
            elif param.dim() == 1:
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    _restore_buffers(model, device)
    return model.requires_grad_(False).eval()
