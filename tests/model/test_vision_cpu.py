"""The fused CPU CLIP layers (``vision_cpu``) against transformers' own CLIP forward."""

from __future__ import annotations

import copy

import pytest
import torch

from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.vision_cpu import FusedClipEncoder


def _crops(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


def test_a_model_loaded_on_the_cpu_runs_the_fused_layers(tiny_model: Phi3VForCausalLM):
    assert tiny_model._fused_clip is not None


@pytest.mark.parametrize("n", [1, 3])
def test_fused_layers_equal_transformers_clip(tiny_model: Phi3VForCausalLM, n: int):
    crops = _crops(n)
    with torch.inference_mode():
        expected = tiny_model.vision_tower(pixel_values=crops).last_hidden_state
        got = tiny_model.clip_hidden_states(crops)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


def test_qkv_weights_are_shared_not_copied(tiny_model: Phi3VForCausalLM):
    """q/k/v's parameters are views of the stacked weight: one copy in memory, the state dict unchanged."""
    fused = tiny_model._fused_clip
    assert fused is not None
    attn = tiny_model.vision_tower.encoder.layers[0].self_attn
    stack = fused.layers[0].qkv_weight
    c = attn.q_proj.weight.shape[0]
    assert attn.q_proj.weight.data_ptr() == stack.data_ptr()
    assert attn.v_proj.weight.data_ptr() == stack[2 * c :].data_ptr()
    assert torch.equal(stack, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_a_wrong_weight_shows(tiny_model: Phi3VForCausalLM):
    """The comparison above can fail: a fused layer reading another bias disagrees with transformers."""
    tower = copy.deepcopy(tiny_model.vision_tower)
    fused = FusedClipEncoder(tower)
    fused.layers[0].qkv_bias = fused.layers[0].qkv_bias + 0.5
    crops = _crops(1)
    with torch.inference_mode():
        assert not torch.allclose(fused(crops), tower(pixel_values=crops).last_hidden_state, atol=1e-3)


def test_only_quick_gelu_is_fused(tiny_model: Phi3VForCausalLM):
    tower = copy.deepcopy(tiny_model.vision_tower)
    tower.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="quick_gelu"):
        FusedClipEncoder(tower)
