"""Decode-step attention: one query per row over that row's slot of the static KV cache.

Rows of one step hold different numbers of tokens (row ``b`` has keys at ``0..positions[b]``),
but the cache has one length for all. Two ways to attend:

- ``sdpa``: scaled-dot-product attention over the whole (span of the) cache with an additive
  mask. Every row reads every position up to the span, so one long row makes all rows read as
  much as it does. Exact, and fast eagerly: the CPU's path, and the GPU's when not compiling.
- ``flex``: FlexAttention with a block mask built from the rows' lengths. The kernel skips the
  cache blocks past each row's length, so each row reads only its own tokens (the cache is most
  of a decode step's memory traffic). Only fused when compiled (``torch.compile``): eagerly it
  materialises the full score matrix, so the engine uses it only in its compiled step.

Both are plain tensor code over ``positions``, so they run inside a captured CUDA graph: the
mask is rebuilt from the graph's static ``positions`` buffer on every replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # cache positions per block of the flex mask; the engine's ctx is a multiple of it
KINDS = ("sdpa", "flex")


def sdpa_mask(positions: torch.Tensor, ctx: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, ctx]: 0 where ``key index <= position``, -inf past it.

    Built once per step in the activations' dtype: SDPA would convert a bool mask to this in
    each layer.
    """
    visible = torch.arange(ctx, device=positions.device)[None] <= positions[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill(~visible, float("-inf"))
    return mask[:, None, None]


def flex_mask(positions: torch.Tensor, ctx: int) -> BlockMask:
    """A block mask over ``ctx`` cache positions where row ``b`` sees keys ``0..positions[b]``.

    The blocks wholly inside a row's length are "full" (no per-element mask work); the block
    holding its last key is "partial" (the mask function cuts it at the position); blocks past
    it are not listed, so the kernel never loads them.
    """
    if ctx % BLOCK:
        raise ValueError(f"cache length {ctx} is not a multiple of {BLOCK}")
    blocks = ctx // BLOCK
    visible = (positions + 1).to(torch.int32)  # keys each row sees
    full = visible // BLOCK  # [B]
    order = torch.arange(blocks, device=positions.device, dtype=torch.int32)
    rows = positions.shape[0]
    full_indices = order.expand(rows, 1, 1, blocks)
    # One partial block, the one after the full ones, unless the row ends on a block boundary;
    # entries past a row's count are never read.
    partial_indices = (order + full[:, None]).clamp(max=blocks - 1).view(rows, 1, 1, blocks)
    partial = (visible % BLOCK != 0).to(torch.int32).view(rows, 1, 1)

    def within(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv <= positions[b]

    return BlockMask.from_kv_blocks(
        partial,
        partial_indices,
        full.view(rows, 1, 1),
        full_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=within,
        seq_lengths=(1, ctx),
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask) -> torch.Tensor:
    """q [B, heads, 1, D] over k, v [B, heads, ctx, D] with a ``sdpa_mask`` or a ``flex_mask``."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
