"""A gpt-fast-style generation engine: static KV cache, batched prefill, graph-captured decode.

How one ``run`` goes (``generate`` is ``run`` over a fixed list):

1. Each request is one image + its prompt ids. Up to ``slots`` of them are *active*, each owning
   one row ("slot") of a preallocated KV cache of shape ``[slots, heads, ctx, head_dim]`` per
   layer. ``ctx`` is fixed for the run and covers every request's prompt plus its token budget
   (rounded up); ``slots`` is what fits in the KV pool, which on a GPU is sized from free memory
   once.
2. Admission (continuous batching): before every step the engine asks its ``Feed`` for as many
   requests as it has free slots, so work that arrives while rows are decoding joins them at the
   next step. New requests are prefilled together (vision tower on their valid crops only,
   batched across the images; one right-padded causal forward) and their keys/values land
   directly in their slots.
3. Decode: one token for every active row per step. Rows keep their own positions (no left
   padding); the step writes each row's new key/value at its position and attends over its slot
   with a ``position >= key index`` mask (``decode_attention``: FlexAttention reading only each
   row's own blocks when compiled, masked SDPA over a span otherwise), so the shapes never
   change. The step also takes the greedy argmax, so the host copies B ids, not B x vocab logits.
   On CUDA the step is captured once per (rows, ctx) into a CUDA graph and replayed; on the CPU
   it runs eagerly.
   ``torch.compile`` (the CUDA default) compiles the step once, before the first caption, with
   the rows and cache-length dimensions symbolic: every bucket and every context length the run
   can take reuse that code, so nothing compiles while rows are waiting, and each captured
   bucket is checked against the eager step once.
4. A row that stops (stop token or budget) is handed to ``Feed.done`` at once and leaves; the
   last active row moves into its slot so the active rows stay a prefix and the step runs on
   the smallest captured bucket.

LongRoPE (phi3v.md §6, §7.7): a row uses the short factors while its length is at most
``original_max_position_embeddings`` and the long ones after. cos/sin come from transformers'
own rotary module, tabulated per position for both factor sets, and each row picks its table.
When a row first grows past the limit its whole cache is recomputed with the long factors from
its saved prompt embeddings (like the reference's cache reset), without re-running the vision
tower.

The attention/cache arithmetic is ours; the layers' own modules (norms, projections, MLP) do the
rest, so the numbers follow transformers' Phi-3 and the token ids match ``generation.generate``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

from phicapd.model import decode_attention
from phicapd.model.generation import SamplingConfig, select_next
from phicapd.model.modeling import Phi3VForCausalLM, pinned, upload
from phicapd.model.processing import ProcessedImage

log = logging.getLogger(__name__)

CTX_ROUND = 256  # ctx granularity: few distinct shapes, so few graphs to capture
GRAPH_CACHE = 48  # captured decode graphs kept (each holds a small private memory pool)
SPANS = 4  # a decode step attends over the first 1/4, 2/4, 3/4 or all of the cache rows
CUDA_WORKSPACE = 3 << 30  # bytes left free beside the KV pool for prefill, CLIP and graph pools
CUDA_MEMORY_FRACTION = 0.92  # of the free memory the pool + workspace may use
COMPILED_AGREEMENT = 0.999  # least cosine similarity of compiled and eager logits, per row
# Graphs dynamo may keep for the decode step. With symbolic rows and ctx the daemon's shapes need
# two (one row is always specialised, "0/1 specialisation"); the margin keeps a guard we did not
# foresee from hitting torch's default of 8, after which it silently stops compiling for good.
RECOMPILE_LIMIT = 64
REGROW_SECONDS = 600.0  # after this long without another out-of-memory error, shrunk limits are restored


@dataclass(frozen=True)
class EngineRequest:
    """One caption job: prompt ids with ``-1`` placeholders for the image, the image, a budget."""

    input_ids: Sequence[int]
    image: ProcessedImage
    max_new_tokens: int
    tag: Any = None  # the caller's handle, given back with the result


class Feed(Protocol):
    """Where ``GenerationEngine.run`` takes requests from and hands results to, on its thread."""

    def take(self, room: int, *, idle: bool) -> list[EngineRequest]:
        """At most ``room`` requests to start now, possibly none; asked before every step.

        ``idle``: no row is running, so waiting a moment to fill a batch costs nothing; an
        empty answer while idle ends the run.
        """
        ...

    def done(self, request: EngineRequest, tokens: list[int]) -> None:
        """A request's new tokens (without the stop token)."""
        ...


class _ListFeed:
    """A fixed list of requests, all offered at once; results keyed by position."""

    def __init__(self, requests: Sequence[EngineRequest]) -> None:
        self._queue = collections.deque(replace(r, tag=i) for i, r in enumerate(requests))
        self.outputs: list[list[int]] = [[] for _ in requests]

    def take(self, room: int, *, idle: bool) -> list[EngineRequest]:
        return [self._queue.popleft() for _ in range(min(room, len(self._queue)))]

    def done(self, request: EngineRequest, tokens: list[int]) -> None:
        self.outputs[request.tag] = tokens


@dataclass
class OomEvent:
    when: float  # time.time()
    phase: str  # "prefill" / "decode" / "capture" / "allocate"
    rows: int  # active rows or rows being prefilled
    action: str  # what the captioner did about it


@dataclass
class _Row:
    """An active request: where it is in its slot and what it has produced."""

    request: EngineRequest
    length: int  # tokens in the cache (prompt + fed generated tokens)
    budget: int
    long_rope: bool
    prompt_embeds: torch.Tensor | None  # kept only if the row may cross the LongRoPE switch
    out: list[int] = field(default_factory=list)


@dataclass
class _Graph:
    """A captured decode step for ``rows`` slots of a ``ctx`` cache, with its static buffers."""

    graph: Any  # torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    long_rope: torch.Tensor
    logits: torch.Tensor
    greedy: torch.Tensor  # argmax of ``logits``, computed inside the graph


class KVPool:
    """One flat allocation viewed as per-layer K/V ``[slots, heads, ctx, head_dim]`` for any split."""

    def __init__(self, layers: int, heads: int, head_dim: int, tokens: int, dtype: torch.dtype, device: torch.device):
        self.layers, self.heads, self.head_dim, self.tokens = layers, heads, head_dim, tokens
        self.data = torch.zeros(layers, 2, tokens * heads * head_dim, dtype=dtype, device=device)

    def view(self, slots: int, ctx: int) -> torch.Tensor:
        """[layers, 2 (k, v), slots, heads, ctx, head_dim]; needs ``slots * ctx <= tokens``."""
        if slots * ctx > self.tokens:
            raise ValueError(f"{slots} slots of {ctx} tokens do not fit a pool of {self.tokens} tokens")
        n = slots * self.heads * ctx * self.head_dim
        return self.data[:, :, :n].view(self.layers, 2, slots, self.heads, ctx, self.head_dim)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def kv_bytes_per_token(c: Phi3Config, dtype: torch.dtype) -> int:
    """K and V of every layer for one token (393,216 bytes for Phi-3.5 in bf16)."""
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class GenerationEngine:
    """Batched generation over a static KV cache for one ``Phi3VForCausalLM``. One thread at a time."""

    def __init__(
        self,
        model: Phi3VForCausalLM,
        *,
        max_slots: int,
        prefill_tokens: int | None = None,
        cuda_graphs: bool | None = None,
        pad_to_bucket: bool | None = None,
        compile: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
        pool_tokens: int | None = None,
        attention: str | None = None,
        dynamic_rows: bool | None = None,
    ) -> None:
        """``cuda_graphs`` defaults to "on a CUDA device"; ``pad_to_bucket`` (default: with graphs)
        runs decode steps at the bucket sizes graphs are captured for; ``compile`` wraps the decode step in
        ``torch.compile`` (on CUDA before capture; the CPU accepts it too, for testing the trace).
        ``pool_tokens`` fixes the KV pool size; by default it is sized from free memory on CUDA
        and grown on demand on the CPU. ``attention`` is the decode attention
        (``decode_attention.KINDS``); by default ``flex`` when compiling, ``sdpa`` otherwise.
        ``dynamic_rows`` compiles one step for every row count (default: on CUDA); without it,
        each bucket compiles on its own and decode steps run at bucket sizes."""
        self.model = model
        self.lm: Phi3ForCausalLM = model.language_model
        c = self.lm.config
        if c.num_key_value_heads != c.num_attention_heads:
            raise ValueError("the engine assumes no grouped-query attention (Phi-3.5 has none)")
        self.heads = c.num_attention_heads
        self.head_dim = c.hidden_size // self.heads
        self.limit = int(c.original_max_position_embeddings or c.max_position_embeddings)
        self.device = model.device
        self.dtype = model.dtype
        self.max_slots = max(1, max_slots)
        # Prompt tokens prefilled in one forward. A GPU gains from batching the vision tower and
        # the short prompts; a CPU is compute-bound at one image, and every prefill stalls the
        # running rows' decode (an interactive request among them), so it takes one at a time.
        self.prefill_tokens = prefill_tokens or (8192 if self.device.type == "cuda" else 1024)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.pad_to_bucket = self.cuda_graphs if pad_to_bucket is None else pad_to_bucket
        self.compile = compile
        self.compile_backend = compile_backend
        self.attention = attention or ("flex" if compile else "sdpa")
        if self.attention not in decode_attention.KINDS:
            raise ValueError(f"attention must be one of {decode_attention.KINDS}, not {self.attention!r}")
        self.dynamic_rows = self.device.type == "cuda" if dynamic_rows is None else dynamic_rows
        if compile and not self.dynamic_rows:
            self.pad_to_bucket = True  # a compile per bucket, not per row count
        self._pool_tokens = pool_tokens
        self.pool: KVPool | None = None
        self._tables: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graphs: collections.OrderedDict[tuple[int, int, int], _Graph] = collections.OrderedDict()
        self._step: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._decode_step
        if compile:
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
            self._step = torch.compile(self._decode_step, backend=compile_backend, fullgraph=True)
        self.stats: dict[str, Any] = {}
        self.reset_stats()
        self.oom_events = 0
        self.last_oom: OomEvent | None = None
        self._configured = (self.max_slots, self.prefill_tokens, pool_tokens)  # what ``regrow`` restores

    def reset_stats(self) -> None:
        """Counters since start (or the last reset): calls, images, steps, rows per step, seconds."""
        self.stats = dict.fromkeys(("calls", "images", "prefills", "recomputes", "decode_steps", "decode_rows"), 0)
        self.stats.update(prefill_s=0.0, decode_s=0.0)

    # -- memory -----------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.lm.config, self.dtype)

    def cuda_budget_tokens(self) -> int:
        """KV tokens that fit in the GPU's free memory, leaving a workspace for everything else."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        ours = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)  # cached by us, reusable
        if self.pool is not None:
            ours += self.pool.nbytes
        usable = int((free + ours) * CUDA_MEMORY_FRACTION) - CUDA_WORKSPACE
        return max(0, usable // self.bytes_per_token)

    def ensure_pool(self, ctx: int, slots: int, typical_ctx: int | None = None) -> KVPool:
        """A pool with room for ``slots`` rows of ``ctx`` tokens where it can, one row at least.

        CPU: grown to exactly what the call needs. CUDA: sized once, from free memory, for
        ``max_slots`` rows of ``typical_ctx``; a call with longer rows gets fewer of them.
        Raises ``torch.OutOfMemoryError`` when even one row cannot be allocated.
        """
        if self._pool_tokens is not None:
            need = want = max(self._pool_tokens, ctx)
        elif self.device.type == "cuda":
            need = ctx
            budget = self.cuda_budget_tokens()
            want = max(ctx, min(self.max_slots * max(ctx, typical_ctx or 0), budget))
        else:
            need = want = slots * ctx
        if self.pool is not None and self.pool.tokens >= need:
            return self.pool
        self.release()
        c = self.lm.config
        try:
            self.pool = KVPool(c.num_hidden_layers, self.heads, self.head_dim, want, self.dtype, self.device)
        except torch.OutOfMemoryError:
            self.pool = None
            self._note_oom("allocate", 0)
            raise
        log.info("KV pool: %d tokens, %.2f GiB", want, self.pool.nbytes / 2**30)
        return self.pool

    def set_pool_tokens(self, tokens: int | None) -> None:
        """Fix the KV pool size (None: from free memory on CUDA, on demand on the CPU)."""
        self.release()
        self._pool_tokens = tokens

    def release(self) -> None:
        """Drop the pool and the captured graphs (their buffers point into the pool)."""
        self._graphs.clear()
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shrink(self) -> bool:
        """After an out-of-memory error: smaller prefill groups, else half the rows that failed.

        Returns False when there is nothing left to shrink (one row, prefilled alone).
        """
        self.release()
        event = self.last_oom
        rows = event.rows if event is not None and event.rows > 0 else self.max_slots
        if event is not None and event.phase == "prefill" and rows > 1:
            self.prefill_tokens = max(1, self.prefill_tokens // 2)
            return True
        if self.max_slots <= 1:
            return False
        self.max_slots = max(1, min(self.max_slots, rows) // 2)
        if self._pool_tokens is not None:
            self._pool_tokens //= 2
        return True

    def regrow_due(self, after: float = REGROW_SECONDS) -> bool:
        """Limits ``shrink`` lowered, and ``after`` seconds without another out-of-memory error."""
        if (self.max_slots, self.prefill_tokens, self._pool_tokens) == self._configured:
            return False
        return self.last_oom is None or time.time() - self.last_oom.when >= after

    def regrow(self, after: float = REGROW_SECONDS) -> bool:
        """Restore the limits ``shrink`` lowered once ``after`` seconds passed without another
        out-of-memory error: one (another process briefly on the GPU, an unusually long prompt)
        must not halve the throughput until the next restart. Between runs only (the pool is
        resized): a running stream stops taking work when it is due, to end its run.
        True when it restored them."""
        if not self.regrow_due(after):
            return False
        configured = self._configured
        self.release()
        self.max_slots, self.prefill_tokens, self._pool_tokens = configured
        log.info("restored %d rows and %d prefill tokens after an out-of-memory error", *configured[:2])
        return True

    def _note_oom(self, phase: str, rows: int) -> None:
        self.oom_events += 1
        self.last_oom = OomEvent(time.time(), phase, rows, action="pending")

    # -- rotary tables ----------------------------------------------------------------------

    def tables(self, ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos_short, sin_short, cos_long, sin_long), each [ctx, head_dim], from transformers' module.

        Calling the rotary module with positions 0..n-1 picks the long factors iff n > limit,
        and each entry is one product per position, so the tables are bit-identical to what
        the module computes inside a forward pass.
        """
        if ctx not in self._tables:
            rotary = self.lm.model.rotary_emb
            rotary = getattr(rotary, "inner", rotary)  # unwrap modeling.RowwiseRotaryEmbedding
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            short_n = min(ctx, self.limit)
            cos_s, sin_s = rotary(probe, torch.arange(short_n, device=self.device)[None])
            long_n = max(ctx, self.limit + 1)
            cos_l, sin_l = rotary(probe, torch.arange(long_n, device=self.device)[None])
            cos_l, sin_l = cos_l[0, :ctx], sin_l[0, :ctx]
            # Positions past the limit are only ever read by long rows; fill short's tail with long.
            cos_s = torch.cat([cos_s[0], cos_l[short_n:]])
            sin_s = torch.cat([sin_s[0], sin_l[short_n:]])
            self._tables[ctx] = tuple(t.contiguous() for t in (cos_s, sin_s, cos_l, sin_l))
        return self._tables[ctx]  # type: ignore[return-value]

    # -- the forward passes -----------------------------------------------------------------

    def _qkv(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x)).view(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, t, head_dim]
        return q, k, v

    def _finish_layer(self, layer: torch.nn.Module, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        x = x + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.model.norm(hidden)).float()

    def _prefill(
        self,
        embeds: torch.Tensor,
        lengths: Sequence[int],
        long_rope: Sequence[bool],
        slots: torch.Tensor,
        kv: torch.Tensor,
    ) -> torch.Tensor:
        """Right-padded rows [G, T, H] into cache ``slots``; next-token logits [G, V].

        Right padding keeps every real query's causal window free of padding, so plain causal
        attention is exact for the real tokens; the pad positions' cache entries lie beyond
        each row's length and are masked, then overwritten, by decode.
        """
        g, t, _ = embeds.shape
        cos_s, sin_s, cos_l, sin_l = self.tables(kv.shape[4])
        use_long = upload(torch.tensor(long_rope), self.device)[:, None, None]
        cos = torch.where(use_long, cos_l[:t], cos_s[:t])[:, None]  # [G, 1, T, D]
        sin = torch.where(use_long, sin_l[:t], sin_s[:t])[:, None]
        x = embeds
        for i, layer in enumerate(self.lm.model.layers):
            q, k, v = self._qkv(layer, x)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            kv[i, 0, slots, :, :t] = k
            kv[i, 1, slots, :, :t] = v
            x = self._finish_layer(layer, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        last = upload(torch.tensor([n - 1 for n in lengths]), self.device)
        return self._logits(x[torch.arange(g, device=self.device), last])

    def _decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        long_rope: torch.Tensor,
        caches: list[torch.Tensor],
        cos_s: torch.Tensor,
        sin_s: torch.Tensor,
        cos_l: torch.Tensor,
        sin_l: torch.Tensor,
        attention: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per slot: tokens/positions/long_rope [B]; ``caches`` K, V, K, V, ... per layer,
        each [B, heads, span, D] (``_caches``). Returns the logits [B, V] and their argmax [B].
        ``attention`` overrides the engine's (the eager reference attends with SDPA).

        Each layer's K and V come as tensors of their own, not as views of one pool tensor:
        torch.compile then writes the new entries in place, where views of a single input made
        it functionalise the writes into copies of the whole pool on every step.
        """
        b, ctx = tokens.shape[0], caches[0].shape[2]
        x = self.lm.model.embed_tokens(tokens)[:, None]  # [B, 1, H]
        pick = long_rope[:, None]
        cos = torch.where(pick, cos_l[positions], cos_s[positions])[:, None, None]  # [B, 1, 1, D]
        sin = torch.where(pick, sin_l[positions], sin_s[positions])[:, None, None]
        if (attention or self.attention) == "flex":
            mask: Any = decode_attention.flex_mask(positions, ctx)
        else:
            mask = decode_attention.sdpa_mask(positions, ctx, x.dtype)
        rows = torch.arange(b, device=tokens.device)
        for i, layer in enumerate(self.lm.model.layers):
            q, k, v = self._qkv(layer, x)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k_cache, v_cache = caches[2 * i], caches[2 * i + 1]
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            x = self._finish_layer(layer, x, decode_attention.attend(q, k_cache, v_cache, mask))
        logits = self._logits(x[:, 0])
        return logits, logits.argmax(-1)

    # -- CUDA graphs ------------------------------------------------------------------------

    def _graph(self, rows: int, ctx: int, span: int) -> _Graph:
        """The captured step for (rows, ctx, span), captured (and, compiled, checked) on first use.

        A compiled step that fails to capture or disagrees with the eager one degrades the
        compile (``_degrade``) and is captured again. Out of memory while capturing is raised
        like any other out-of-memory error, so the caller retries with fewer rows (then fewer
        crops); it says nothing about the compiler.
        """
        key = (rows, ctx, span)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while True:
            compiled = self.compile
            entry: _Graph | None = None
            try:
                entry = self._capture(rows, ctx, span)
            except torch.OutOfMemoryError:
                raise
            except Exception:
                if not compiled:
                    raise
                log.exception("capturing the compiled decode step failed")
            if entry is not None and compiled:
                entry = self._checked(entry, rows, ctx, span)
            elif entry is None:
                self._degrade()
                torch.cuda.empty_cache()  # outside the handler: its traceback held the failed capture
            if entry is not None:
                break
        self._graphs[key] = entry
        while len(self._graphs) > GRAPH_CACHE:
            self._graphs.popitem(last=False)
        return entry

    def _checked(self, entry: _Graph, rows: int, ctx: int, span: int) -> _Graph | None:
        """``entry`` if its replay gives the eager step's logits, else None (compile degraded)."""

        def replay(tokens: torch.Tensor, positions: torch.Tensor, long_rope: torch.Tensor, *_: Any) -> Any:
            entry.tokens.copy_(tokens)
            entry.positions.copy_(positions)
            entry.long_rope.copy_(long_rope)
            entry.graph.replay()
            return entry.logits, entry.greedy

        return entry if self._agrees(replay, rows, ctx, span, what=f"the captured {rows}-row step") else None

    def _degrade(self) -> None:
        """After a compiled step failed or disagreed: one step down, never a crash.

        Symbolic rows -> one compile per row bucket (a compiler may not handle a symbolic batch
        in every kernel; torch's CPU FlexAttention template does not) -> the eager step, which
        attends with SDPA (eager FlexAttention materialises every score).
        """
        if self.compile and self.dynamic_rows:
            log.warning("compiling the decode step for any row count failed; compiling each row bucket instead")
            self.dynamic_rows, self.pad_to_bucket = False, True
            return
        log.warning("decoding without torch.compile")
        self.compile, self._step, self.attention = False, self._decode_step, "sdpa"
        self._graphs.clear()

    def _step_args(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        long_rope: torch.Tensor,
        caches: list[torch.Tensor],
        ctx: int,
    ) -> tuple[Any, ...]:
        """The decode step's arguments; compiled, with the cache length (and rows) marked symbolic.

        One compiled step then serves every context length the run can take, and every bucket
        with ``dynamic_rows`` (one row is specialised by torch anyway; without it, one compile per
        bucket, all in ``warm_up``): a new shape during a run replays a graph capture, never a
        compile, and torch's recompile limit is never in reach.
        """
        tables = self.tables(ctx)
        if self.compile:
            # Rows: symbolic, or pinned per bucket so dynamo's automatic dynamic shapes cannot
            # make them symbolic behind our back.
            rows = torch._dynamo.maybe_mark_dynamic if self.dynamic_rows else torch._dynamo.mark_static
            for t in (tokens, positions, long_rope, *caches):
                if t.shape[0] > 1:
                    rows(t, 0)
            for t in caches:
                torch._dynamo.maybe_mark_dynamic(t, 2)
            for t in tables:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return (tokens, positions, long_rope, caches, *tables)

    def _probe_inputs(self, rows: int, ctx: int, span: int, tokens: torch.Tensor) -> tuple[Any, ...]:
        """Decode-step arguments for a step outside the generation loop (capture, checks).

        They run on real slots and write only position ``span - 1``, which holds no row's data
        (``span_for``: every active row is shorter; the entry a row writes next is overwritten
        by that write).
        """
        assert self.pool is not None
        positions = torch.full((rows,), span - 1, dtype=torch.long, device=self.device)
        long_rope = torch.zeros(rows, dtype=torch.bool, device=self.device)
        caches = self._caches(self.pool.view(rows, ctx), rows, span)
        return self._step_args(tokens, positions, long_rope, caches, ctx)

    def _capture(self, rows: int, ctx: int, span: int) -> _Graph:
        args = self._probe_inputs(rows, ctx, span, torch.zeros(rows, dtype=torch.long, device=self.device))
        tokens, positions, long_rope = args[:3]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile (if on) and let kernels pick their algorithms outside capture
                self._step(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the decode pool and the socket threads may touch CUDA (pinned memory)
        # while a graph is captured mid-run; only this thread's calls must be capturable.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits, greedy = self._step(*args)
        return _Graph(graph, tokens, positions, long_rope, logits, greedy)

    def _caches(self, kv: torch.Tensor, rows: int, span: int) -> list[torch.Tensor]:
        """The decode step's K, V, K, V, ... per layer: the first ``rows`` slots, ``span`` positions."""
        return [kv[i, j, :rows, :, :span] for i in range(kv.shape[0]) for j in (0, 1)]

    @staticmethod
    def spans(ctx: int) -> list[int]:
        """Cache prefixes a decode step may attend over: quarters of ``ctx``, rounded up."""
        return sorted({min(ctx, _round_up(ctx * q // SPANS, CTX_ROUND)) for q in range(1, SPANS + 1)})

    def span_for(self, longest: int, ctx: int) -> int:
        """The shortest span that holds a row of ``longest`` tokens plus the one it feeds next.

        A masked-SDPA step reads every row's keys up to the span, so rows much shorter than
        ``ctx`` (a cache sized for the largest image, holding smaller ones) read that much less
        memory. FlexAttention reads each row's own blocks only: it always takes the whole cache,
        one shape fewer per bucket.
        """
        if self.attention == "flex":
            return ctx
        return next(s for s in self.spans(ctx) if s > longest)

    def buckets(self, slots: int) -> list[int]:
        """Row counts decode steps run at: powers of two below ``slots``, and ``slots``."""
        out, n = [], 1
        while n < slots:
            out.append(n)
            n *= 2
        return [*out, slots]

    def _decode(self, rows: list[_Row], tokens: list[int], kv_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next logits [len(rows), V] and their argmax after feeding ``tokens`` to the active prefix."""
        n, ctx = len(rows), kv_all.shape[4]
        bucket = next(b for b in self.buckets(kv_all.shape[2]) if b >= n) if self.pad_to_bucket else n
        span = self.span_for(max(r.length for r in rows), ctx)
        pad = bucket - n  # idle slots past the active prefix: their own rows, any position will do
        tokens = tokens + [0] * pad
        positions = [r.length for r in rows] + [span - 1] * pad
        long_rope = [r.long_rope for r in rows] + [False] * pad
        if self.cuda_graphs:
            g = self._graph(bucket, ctx, span)
            # Straight from pinned memory into the graph's buffers: queued, no device temporaries.
            for buffer, values in ((g.tokens, tokens), (g.positions, positions), (g.long_rope, long_rope)):
                buffer.copy_(pinned(torch.tensor(values), self.device), non_blocking=True)
            g.graph.replay()
            return g.logits[:n], g.greedy[:n]
        inputs = [upload(torch.tensor(x), self.device) for x in (tokens, positions, long_rope)]
        logits, greedy = self._step(*self._step_args(*inputs, self._caches(kv_all, bucket, span), ctx))
        return logits[:n], greedy[:n]

    def warm_up(self, ctx: int, slots: int) -> None:
        """Before the first caption: allocate the pool and, for ``ctx``, compile the decode step
        (checking every bucket against the eager step) and capture the graph of every bucket.

        Out of memory on the way shrinks the rows, as it would in a run, and starts again.
        """
        while True:
            try:
                self._warm_up(ctx, slots)
                return
            except torch.OutOfMemoryError:
                self._note_oom("capture", self.max_slots)
            # Outside the handler: its traceback would keep what failed to fit alive.
            if not self.shrink():
                raise torch.OutOfMemoryError(f"out of memory warming up one row of {ctx} tokens")
            assert self.last_oom is not None
            self.last_oom.action = f"warming up with at most {self.max_slots} rows"
            log.warning("out of memory warming up the decode step; %s", self.last_oom.action)

    def _warm_up(self, ctx: int, slots: int) -> None:
        pool = self.ensure_pool(ctx, slots, ctx)
        slots = max(1, min(slots, self.max_slots, pool.tokens // ctx))
        buckets = self.buckets(slots)
        if self.cuda_graphs:
            for span in reversed([ctx] if self.attention == "flex" else self.spans(ctx)):
                for rows in buckets:
                    self._graph(rows, ctx, span)
            return
        for rows in buckets:  # compiled on the CPU (tests): compile and check what the run will take
            while self.compile and not self._agrees(self._step, rows, ctx, ctx, what=f"the compiled {rows}-row step"):
                pass  # degraded one step: try again, until it agrees or compiling is off

    def _agrees(self, candidate: Callable[..., Any], rows: int, ctx: int, span: int, *, what: str) -> bool:
        """Whether ``candidate`` (the compiled step, or a graph of it) gives the eager step's logits.

        Run once per bucket before any caption does: a compiler failure, or logits that disagree
        (a miscompile would caption garbage without an error), ``_degrade`` the compile, down to
        the eager step, captured in CUDA graphs, slower but right. Out of memory is raised.
        """
        generator = torch.Generator().manual_seed(rows)
        tokens = torch.randint(0, self.lm.config.vocab_size, (rows,), generator=generator).to(self.device)
        args = self._probe_inputs(rows, ctx, span, tokens)
        try:
            compiled = candidate(*args)[0].float()
        except torch.OutOfMemoryError:
            raise
        except Exception:
            log.exception("compiling the decode step failed")
            self._degrade()
            return False
        eager = self._decode_step(*args, attention="sdpa")[0].float()  # the reference: eager, masked SDPA
        agreement = F.cosine_similarity(compiled, eager, dim=-1).min().item()
        if not agreement >= COMPILED_AGREEMENT:  # also catches NaN
            log.error("%s disagrees with the eager one (cosine %.4f < %.4f)", what, agreement, COMPILED_AGREEMENT)
            self._degrade()
            return False
        return True

    # -- the generation loop ----------------------------------------------------------------

    @staticmethod
    def ctx_for(tokens: int) -> int:
        """Cache length for rows of up to ``tokens`` (prompt + budget); position ctx - 1 stays free."""
        return _round_up(tokens + 1, CTX_ROUND)

    def plan(self, requests: Sequence[EngineRequest]) -> tuple[int, int]:
        """(ctx, wanted slots) for a call; the pool may hold fewer slots."""
        ctx = self.ctx_for(max(len(r.input_ids) + r.max_new_tokens for r in requests))
        return ctx, min(len(requests), self.max_slots)

    def generate(
        self,
        requests: Sequence[EngineRequest],
        stop_ids: frozenset[int],
        sampling: SamplingConfig | None = None,
        typical_ctx: int | None = None,
    ) -> list[list[int]]:
        """Each request's new tokens (without the stop token), in order: ``run`` over a fixed list."""
        feed = _ListFeed(requests)
        if any(r.max_new_tokens > 0 for r in requests):  # no pool for nothing to do
            ctx, slots = self.plan(requests)
            self.run(feed, ctx, stop_ids, sampling, slots=slots, typical_ctx=typical_ctx)
        return feed.outputs

    def fits(self, request: EngineRequest, ctx: int) -> bool:
        """Whether ``request`` (prompt + budget) fits rows of ``ctx`` tokens."""
        return len(request.input_ids) + request.max_new_tokens < ctx

    def run(
        self,
        feed: Feed,
        ctx: int,
        stop_ids: frozenset[int],
        sampling: SamplingConfig | None = None,
        *,
        slots: int | None = None,
        typical_ctx: int | None = None,
    ) -> None:
        """Generate for whatever ``feed`` hands over until it has nothing more and no row is active.

        ``feed.take`` is asked before every step, so a request that arrives while rows are
        decoding is prefilled at the next step boundary and joins them; every request must fit
        rows of ``ctx`` tokens (``fits``). Each finished request goes to ``feed.done`` at once.
        """
        sampling = sampling or SamplingConfig()
        pool = self.ensure_pool(ctx, slots or self.max_slots, typical_ctx)
        slots = max(1, min(slots or self.max_slots, self.max_slots, pool.tokens // ctx))
        kv_all = pool.view(slots, ctx)
        self.stats["calls"] += 1
        active: list[_Row] = []
        pending: list[int] = []  # the token each active row feeds next
        waiting: collections.deque[EngineRequest] = collections.deque()

        def record(row: _Row, token: int) -> bool:
            """Append a sampled token; True when the row is finished."""
            if token in stop_ids:
                return True
            row.out.append(token)
            return len(row.out) >= row.budget

        def retire(finished: set[int]) -> None:
            """Drop finished rows; move the last rows into their slots so the active set stays a prefix."""
            for i in sorted(finished, reverse=True):
                feed.done(active[i].request, active[i].out)
                last = len(active) - 1
                if i != last:
                    n = active[last].length  # the entries it has; the rest is masked until written
                    kv_all[:, :, i, :, :n].copy_(kv_all[:, :, last, :, :n])
                    active[i], pending[i] = active[last], pending[last]
                active.pop()
                pending.pop()

        while True:
            for request in feed.take(max(0, slots - len(active) - len(waiting)), idle=not active and not waiting):
                if not self.fits(request, ctx):
                    raise ValueError(
                        f"a request of {len(request.input_ids)} + {request.max_new_tokens} tokens "
                        f"does not fit rows of {ctx}"
                    )
                self.stats["images"] += 1
                if request.max_new_tokens > 0:
                    waiting.append(request)
                else:
                    feed.done(request, [])
            if not waiting and not active:
                return
            started = time.perf_counter()  # phases are timed to the host sync in .tolist()
            if waiting and len(active) < slots:
                group = self._take_group(waiting, slots - len(active))
                first = len(active)
                try:
                    logits, rows = self._admit(group, kv_all, first)
                except torch.OutOfMemoryError:
                    self._note_oom("prefill", len(group))
                    raise
                tokens = select_next(logits, sampling).tolist()
                self.stats["prefill_s"] += time.perf_counter() - started
                active += rows
                pending += tokens
                retire({first + j for j, (r, t) in enumerate(zip(rows, tokens, strict=True)) if record(r, t)})
                continue
            try:
                logits, greedy = self._decode(active, pending, kv_all)
            except torch.OutOfMemoryError:
                self._note_oom("decode", len(active))
                raise
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(active)
            recomputed = False
            for j, row in enumerate(active):
                row.length += 1
                if not row.long_rope and row.length > self.limit:
                    logits[j] = self._recompute(row, kv_all, j)
                    recomputed = True
            # Greedy: the step's own argmax, so the host copies B ids rather than B x vocab logits.
            chosen = greedy if not sampling.do_sample and not recomputed else select_next(logits, sampling)
            tokens = chosen.tolist()
            self.stats["decode_s"] += time.perf_counter() - started
            pending = tokens
            retire({j for j, (r, t) in enumerate(zip(active, tokens, strict=True)) if record(r, t)})

    def _take_group(self, waiting: collections.deque[EngineRequest], room: int) -> list[EngineRequest]:
        """The next requests to prefill together: at most ``room``, within the token budget (>= 1)."""
        group = [waiting.popleft()]
        width = len(group[0].input_ids)
        while waiting and len(group) < room:
            nxt = max(width, len(waiting[0].input_ids))
            if nxt * (len(group) + 1) > self.prefill_tokens:
                break
            width = nxt
            group.append(waiting.popleft())
        return group

    def _admit(self, reqs: list[EngineRequest], kv_all: torch.Tensor, first: int) -> tuple[torch.Tensor, list[_Row]]:
        """Prefill ``reqs`` into slots ``first..``; their first logits and active rows."""
        lengths = [len(r.input_ids) for r in reqs]
        width = max(lengths)
        # Right padding with id 0: whatever sits there is never attended by a real token.
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        for j, r in enumerate(reqs):
            ids[j, : lengths[j]] = torch.tensor(list(r.input_ids))
        embeds = self.model.embed_images(ids, [r.image for r in reqs])  # host ids: no sync there
        long_rope = [n > self.limit for n in lengths]
        slots = torch.arange(first, first + len(reqs), device=self.device)
        logits = self._prefill(embeds, lengths, long_rope, slots, kv_all)
        self.stats["prefills"] += 1
        rows = []
        for j, r in enumerate(reqs):
            # Only a row that starts short and may outgrow the limit needs its prompt again.
            crosses = not long_rope[j] and lengths[j] + r.max_new_tokens - 1 > self.limit
            saved = embeds[j, : lengths[j]].clone() if crosses else None
            rows.append(_Row(r, lengths[j], r.max_new_tokens, long_rope[j], saved))
        return logits, rows

    def _recompute(self, row: _Row, kv_all: torch.Tensor, slot: int) -> torch.Tensor:
        """The LongRoPE switch: rebuild the row's cache with long factors from prompt + fed tokens."""
        assert row.prompt_embeds is not None
        fed = torch.tensor(row.out, device=self.device)  # every generated token so far has been fed
        embeds = torch.cat([row.prompt_embeds, self.lm.model.embed_tokens(fed)])[None]
        row.long_rope, row.prompt_embeds = True, None
        self.stats["recomputes"] += 1
        slots = torch.tensor([slot], device=self.device)
        return self._prefill(embeds, [row.length], [True], slots, kv_all)[0]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "decode": ("cuda-graphs" if self.cuda_graphs else "eager") + ("+compile" if self.compile else ""),
            "attention": self.attention,
            "max_slots": self.max_slots,
            "kv_bytes_per_token": self.bytes_per_token,
            "kv_pool_tokens": self.pool.tokens if self.pool else 0,
            "kv_pool_bytes": self.pool.nbytes if self.pool else 0,
            "graphs": len(self._graphs),
            "oom_events": self.oom_events,
            **self.stats,
        }
        if self.last_oom is not None:
            info["last_oom"] = dict(vars(self.last_oom))
        return info
