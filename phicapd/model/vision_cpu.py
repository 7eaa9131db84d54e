"""CLIP's encoder layers on the CPU with fewer, larger and fused kernels; the same numbers.

On the CPU the vision tower costs about 1.8 TFLOP per image at ``num_crops = 4`` (5 crops of
577 tokens through 23 layers): all of a caption's time under the benches' tiny LM (the README's
stage profile), a quarter of it under Phi-3.5's own, and nearly all of it is GEMMs.
transformers' CLIP layer runs them through ``addmm`` (MKL; the bias is first copied into the
output, one more pass per projection), three separate q/k/v projections, and quick-GELU as
three passes into three new tensors. Here each layer is, with the layer's own weights:

* q, k and v as one GEMM (their weights stacked once; the modules' weights become views of the
  stack, so the state dict and transformers' own forward see the same tensors, no copy);
* every projection through oneDNN with its bias in the kernel, and the residual adds of
  ``out_proj`` and ``fc2`` fused into the GEMM as a post-op (the same fp32 sums, no extra pass);
* SDPA reading q/k/v as strided views of the fused output (no ``.contiguous()``);
* quick-GELU in place: ``x * sigmoid(1.702 * x)`` into one new tensor, op for op as
  transformers, so the same bits.

Only the GEMMs' summation order differs from MKL's (both are fp32 with fp32 accumulation), so
features agree with transformers' forward to float rounding (tests/model/test_vision_cpu.py)
and captions do not change. The embeddings and pre-layernorm are transformers' own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QUICK_GELU = 1.702  # transformers' QuickGELUActivation


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` through oneDNN where torch has it (bias inside the kernel)."""
    if _onednn():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``, the add fused into oneDNN's GEMM where possible."""
    if _onednn():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return residual + F.linear(x, weight, bias)


@dataclass
class _Layer:
    norm1: nn.LayerNorm
    qkv_weight: torch.Tensor  # [3C, C]: q, k, v stacked
    qkv_bias: torch.Tensor
    out: nn.Linear
    norm2: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    heads: int
    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        h = self.norm1(x)
        qkv = linear(h, self.qkv_weight, self.qkv_bias).view(b, s, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D], strided
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # SDPA's CPU kernel lays its output out as [B, S, H, D]: this reshape is a view there.
        x = linear_add(attn.transpose(1, 2).reshape(b, s, c), self.out.weight, self.out.bias, x)
        h = linear(self.norm2(x), self.fc1.weight, self.fc1.bias)
        gate = h * QUICK_GELU
        h.mul_(gate.sigmoid_())
        return linear_add(h, self.fc2.weight, self.fc2.bias, x)


def _stack_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One [3C, C] weight and [3C] bias; q/k/v's parameters become views of them (no copy kept)."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight.detach() for p in projections])
    bias = torch.cat([p.bias.detach() for p in projections])
    c = attn.q_proj.weight.shape[0]
    for i, p in enumerate(projections):
        p.weight.data = weight[i * c : (i + 1) * c]
        p.bias.data = bias[i * c : (i + 1) * c]
    return weight, bias


class FusedClipEncoder:
    """``tower(pixel_values).last_hidden_state`` for a transformers ``CLIPVisionModel``, fused."""

    def __init__(self, tower: nn.Module) -> None:
        self.tower = tower
        if tower.config.hidden_act != "quick_gelu":
            raise ValueError(f"the fused CLIP layer implements quick_gelu, not {tower.config.hidden_act}")
        self.layers = []
        for layer in tower.encoder.layers:
            attn = layer.self_attn
            weight, bias = _stack_qkv(attn)
            self.layers.append(
                _Layer(
                    layer.layer_norm1, weight, bias, attn.out_proj, layer.layer_norm2,
                    layer.mlp.fc1, layer.mlp.fc2, attn.num_heads, attn.scale,
                )
            )  # fmt: skip

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values.to(self.tower.dtype)))
        for layer in self.layers:
            x = layer(x)
        return x
