"""A small generation loop we own: prefill, then one decode step at a time with a KV cache.

Kept deliberately separate from ``GenerationMixin.generate`` (whose internals keep changing
across 5.x) and split into ``prefill`` / ``decode_step`` / ``select_next`` so that a static-cache,
compiled engine can replace the pieces one by one.

LongRoPE: a sequence longer than ``original_max_position_embeddings`` uses the long factors,
which changes the keys of *every* earlier position. Like the reference (phi3v.md §7.7), when a
row first grows past that length we drop the cache and re-run the whole sequence, from the
saved input embeddings (so the vision tower does not run again).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, Phi3ForCausalLM

# transformers renamed the cache argument ("past_key_values" -> "cache") during 5.x.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Phi3ForCausalLM.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class DecodeState:
    """What the loop carries between steps for a batch of left-padded rows."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens (prompt + generated), 0 for left padding
    lengths: list[int]  # real tokens per row so far (prompt + fed generated tokens)
    long_rope: list[bool]  # whether the row's cached keys were computed with the long factors
    prompt_embeds: torch.Tensor  # [B, L, H] kept for a LongRoPE recompute
    fed_tokens: list[torch.Tensor] = field(default_factory=list)  # [B] per generated step


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0..n-1 over each row's real tokens; padding gets 1 (as in transformers' generate)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _run(
    lm: Phi3ForCausalLM,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    out = lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_CACHE_ARG: cache},
    )
    return out.logits[:, -1].float()


def prefill(
    lm: Phi3ForCausalLM, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompts; return next-token logits [B, V] and the state for decoding."""
    cache = DynamicCache(config=lm.config)
    logits = _run(lm, prompt_embeds, attention_mask, position_ids_from_mask(attention_mask), cache)
    lengths = attention_mask.sum(-1).tolist()
    limit = lm.config.original_max_position_embeddings
    state = DecodeState(
        cache=cache,
        attention_mask=attention_mask,
        lengths=lengths,
        long_rope=[n > limit for n in lengths],
        prompt_embeds=prompt_embeds,
    )
    return logits, state


def needs_recompute(lm: Phi3ForCausalLM, state: DecodeState, active: Sequence[bool]) -> bool:
    """True when feeding one more token takes an active short-factor row past the LongRoPE switch."""
    limit = lm.config.original_max_position_embeddings
    rows = zip(active, state.long_rope, state.lengths, strict=True)
    return any(a and not long and n + 1 > limit for a, long, n in rows)


def decode_step(lm: Phi3ForCausalLM, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row through the cache; return the next logits [B, V]."""
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(tokens.shape[0], 1)], 1)
    position_ids = torch.tensor(state.lengths, device=tokens.device)[:, None]
    state.lengths = [n + 1 for n in state.lengths]
    state.fed_tokens.append(tokens)
    embeds = lm.get_input_embeddings()(tokens[:, None])
    return _run(lm, embeds, state.attention_mask, position_ids, state.cache)


def recompute_step(lm: Phi3ForCausalLM, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Like ``decode_step`` but rebuild the cache from the whole sequence (new LongRoPE factors)."""
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(tokens.shape[0], 1)], 1)
    state.lengths = [n + 1 for n in state.lengths]
    state.fed_tokens.append(tokens)
    generated = lm.get_input_embeddings()(torch.stack(state.fed_tokens, dim=1))
    embeds = torch.cat([state.prompt_embeds, generated], dim=1)
    state.cache = DynamicCache(config=lm.config)
    limit = lm.config.original_max_position_embeddings
    state.long_rope = [n > limit for n in state.lengths]
    return _run(lm, embeds, state.attention_mask, position_ids_from_mask(state.attention_mask), state.cache)


def select_next(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Greedy argmax, or temperature + nucleus (top-p) sampling."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampling.generator).squeeze(-1)


def generate(
    lm: Phi3ForCausalLM,
    prompt_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: Sequence[int],
    stop_ids: frozenset[int],
    pad_id: int,
    sampling: SamplingConfig | None = None,
) -> list[list[int]]:
    """Generate for left-padded rows; return each row's new tokens without the stop token."""
    sampling = sampling or SamplingConfig()
    batch = prompt_embeds.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    active = [n > 0 for n in max_new_tokens]
    if not any(active):
        return outputs
    logits, state = prefill(lm, prompt_embeds, attention_mask)
    while True:
        tokens = select_next(logits, sampling)
        for row, token in enumerate(tokens.tolist()):
            if not active[row]:
                continue
            if token in stop_ids:
                active[row] = False
                continue
            outputs[row].append(token)
            active[row] = len(outputs[row]) < max_new_tokens[row]
        if not any(active):
            return outputs
        # Finished rows keep being fed a pad token; nothing else reads their outputs.
        tokens = tokens.masked_fill(~torch.tensor(active, device=tokens.device), pad_id)
        step = recompute_step if needs_recompute(lm, state, active) else decode_step
        logits = step(lm, tokens, state)
