"""The decode step as the GPU runs it, checked on the CPU: FlexAttention over each row's own
length, one compile for every shape, every captured bucket checked against the eager step, and
out of memory while capturing handled like any other out-of-memory error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from phicapd.model import decode_attention
from phicapd.model.captioner import Phi3VCaptioner
from phicapd.model.engine import EngineRequest, GenerationEngine, _Graph, _ListFeed
from tests.model.helpers import make_captioner
from tests.model.test_engine import _engine_requests, _run, _simple_loop

# Eager FlexAttention (the reference side of these tests) is unfused, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Phi3VCaptioner:
    return make_captioner(tiny_checkpoint, strip_openers=[])


@pytest.fixture(scope="module")
def reference(captioner: Phi3VCaptioner) -> tuple[list[EngineRequest], list[list[int]]]:
    requests = _engine_requests(captioner, [14, 9, 20, 1, 17])
    return requests, _simple_loop(captioner, requests, frozenset())


# -- the attention itself ---------------------------------------------------------------------


def test_flex_attention_equals_masked_sdpa_at_block_edges():
    generator = torch.Generator().manual_seed(0)
    ctx = 512
    positions = torch.tensor([0, 126, 127, 128, 255, 300, 510])  # block edges on both sides
    q, k, v = (torch.randn(7, 4, n, 16, generator=generator) for n in (1, ctx, ctx))
    flex = decode_attention.attend(q, k, v, decode_attention.flex_mask(positions, ctx))
    sdpa = decode_attention.attend(q, k, v, decode_attention.sdpa_mask(positions, ctx, q.dtype))
    torch.testing.assert_close(flex, sdpa)
    # Not vacuous: a key past a row's position changes nothing, one within it does.
    k[:, :, 1] += 100.0
    moved = decode_attention.attend(q, k, v, decode_attention.flex_mask(positions, ctx))
    assert torch.equal(moved[0], flex[0])  # row 0 sees key 0 only
    assert not torch.allclose(moved[1], flex[1])


def test_the_flex_mask_lists_only_each_rows_own_blocks():
    """What makes a row read its own tokens only: blocks past its length are not in the mask."""
    positions = torch.tensor([0, 127, 128, 1000, 2302])
    mask = decode_attention.flex_mask(positions, 2304)
    full = mask.full_kv_num_blocks.flatten().tolist()
    partial = mask.kv_num_blocks.flatten().tolist()
    assert full == [0, 1, 1, 7, 17]  # (position + 1) // 128
    assert partial == [1, 0, 1, 1, 1]  # the block holding the last key, unless it ends one
    assert [f + p for f, p in zip(full, partial, strict=True)] == [1, 1, 2, 8, 18]  # of 18 in the cache
    assert mask.kv_indices[3, 0, 0, 0].item() == 7  # the partial block is the one after the full ones
    with pytest.raises(ValueError, match="multiple of 128"):
        decode_attention.flex_mask(positions, 2300)


def test_flex_decode_batched_equals_single_token_for_token(captioner, reference):
    requests, expected = reference
    engine = GenerationEngine(captioner.model, max_slots=8, attention="flex")
    assert engine.span_for(10, 2048) == 2048  # one shape per bucket: the mask does the cutting
    assert _run(engine, requests) == expected
    assert [_run(engine, [r])[0] for r in requests] == expected
    with pytest.raises(ValueError, match="attention must be one of"):
        GenerationEngine(captioner.model, max_slots=1, attention="paged")


# -- one compile for every shape --------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo caches compiled code per function, across engines: counts start from nothing."""
    torch._dynamo.reset()


# aot_eager traces exactly what inductor would be given (dynamo guards, graphs, recompiles)
# without a C++ compile per graph; PHICAPD_TEST_COMPILE_BACKEND=inductor runs the real compiler
# (about a minute per graph on two cores).
BACKEND = os.environ.get("PHICAPD_TEST_COMPILE_BACKEND", "aot_eager")


def _compiled(captioner: Phi3VCaptioner, **kwargs) -> GenerationEngine:
    return GenerationEngine(captioner.model, max_slots=4, compile=True, compile_backend=BACKEND, **kwargs)


@pytest.mark.parametrize("dynamic_rows", [True, False])
def test_nothing_compiles_after_warm_up_for_any_bucket_or_context_length(captioner, reference, dynamic_rows):
    if BACKEND == "inductor" and dynamic_rows:
        pytest.skip("torch's CPU FlexAttention template cannot compile a symbolic batch (the fallback is tested)")
    requests, expected = reference
    engine = _compiled(captioner, dynamic_rows=dynamic_rows)
    assert engine.attention == "flex"
    ctx = engine.plan(requests)[0]
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        engine.warm_up(ctx, 4)
    assert engine.compile
    # Symbolic rows: one row is specialised by torch ("0/1 specialisation"), every other row
    # count shares a graph. Per bucket: one each for 1, 2 and 4 rows.
    assert counters["stats"]["unique_graphs"] - before == (2 if dynamic_rows else 3)
    warmed = counters["stats"]["unique_graphs"]
    for run_ctx in (ctx, 2 * ctx):  # a longer prompt or budget later in the run
        # Every row count from 4 down to 1 (symbolic rows), and the buckets 1, 2, 4.
        for pad in (False, True) if dynamic_rows else (True,):
            engine.pad_to_bucket = pad
            feed = _ListFeed(requests)
            with torch.inference_mode():
                engine.run(feed, run_ctx, frozenset())
            assert feed.outputs == expected, (run_ctx, pad)
    assert counters["stats"]["unique_graphs"] == warmed
    assert engine.compile and engine.attention == "flex" and engine.dynamic_rows == dynamic_rows  # no fallback


def test_a_compiler_without_symbolic_rows_compiles_each_bucket_instead(captioner, reference):
    """torch's CPU FlexAttention template fails on a symbolic batch: one step down, not eager."""
    requests, expected = reference
    engine = _compiled(captioner, dynamic_rows=True)
    compiled = engine._step

    def no_symbolic_rows(*args):
        if engine.dynamic_rows and args[0].shape[0] > 1:
            raise RuntimeError("CppCompileError: 'cur_kvSplitSize6' was not declared in this scope")
        return compiled(*args)

    engine._step = no_symbolic_rows
    with torch.inference_mode():
        engine.warm_up(engine.plan(requests)[0], 4)
    assert engine.compile and not engine.dynamic_rows and engine.pad_to_bucket
    assert _run(engine, requests[:3]) == expected[:3]


def test_a_miscompile_at_any_bucket_turns_compiling_off(captioner, reference):
    requests, expected = reference
    engine = _compiled(captioner)
    compiled = engine._step
    seen: list[int] = []

    def wrong_at_four_rows(*args):
        logits, _ = compiled(*args)
        seen.append(logits.shape[0])
        if logits.shape[0] == 4:
            logits = logits.flip(-1)
        return logits, logits.argmax(-1)

    engine._step = wrong_at_four_rows
    with torch.inference_mode():
        engine.warm_up(engine.plan(requests)[0], 4)
    assert seen == [1, 2, 4]  # every bucket was checked; only the last one was wrong
    assert not engine.compile and engine.attention == "sdpa"
    assert _run(engine, requests[:2]) == expected[:2]


# -- CUDA graphs, with a stand-in for the capture ---------------------------------------------


class _Replay:
    """A captured step's stand-in on the CPU: replay runs the step on the graph's own buffers."""

    def __init__(self, engine: GenerationEngine, args: tuple, outputs: tuple[torch.Tensor, torch.Tensor]):
        self.engine, self.args, self.outputs = engine, args, outputs
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for out, value in zip(self.outputs, self.engine._step(*self.args), strict=True):
            out.copy_(value)


def _graph_engine(captioner: Phi3VCaptioner, fail_rows: int | None = None) -> GenerationEngine:
    engine = _compiled(captioner, cuda_graphs=True)

    def capture(rows: int, ctx: int, span: int) -> _Graph:
        if fail_rows is not None and rows >= fail_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected while capturing)")
        args = engine._probe_inputs(rows, ctx, span, torch.zeros(rows, dtype=torch.long))
        logits, greedy = engine._step(*args)
        return _Graph(_Replay(engine, args, (logits, greedy)), *args[:3], logits, greedy)

    engine._capture = capture  # type: ignore[method-assign]
    return engine


def test_graph_replays_give_the_eager_tokens_and_each_graph_is_checked_once(captioner, reference):
    requests, expected = reference
    engine = _graph_engine(captioner)
    ctx = engine.plan(requests)[0]
    with torch.inference_mode():
        engine.warm_up(ctx, 4)
    assert sorted(engine._graphs) == [(1, ctx, ctx), (2, ctx, ctx), (4, ctx, ctx)]
    assert [g.graph.replays for g in engine._graphs.values()] == [1, 1, 1]  # the check against eager
    assert _run(engine, requests[:3]) == expected[:3]
    assert engine.compile and sum(g.graph.replays for g in engine._graphs.values()) > 3


def test_a_graph_that_disagrees_with_the_eager_step_is_recaptured_eagerly(captioner, reference):
    requests, expected = reference
    engine = _graph_engine(captioner)
    compiled = engine._step

    def wrong_at_two_rows(*args):
        logits, greedy = compiled(*args)
        return (logits.flip(-1), greedy) if logits.shape[0] == 2 else (logits, greedy)

    engine._step = wrong_at_two_rows
    with torch.inference_mode():
        engine.warm_up(engine.plan(requests)[0], 4)
    assert not engine.compile
    assert _run(engine, requests[:2]) == expected[:2]


def test_out_of_memory_while_capturing_is_an_out_of_memory_error(captioner, reference):
    requests, expected = reference
    engine = _graph_engine(captioner, fail_rows=4)
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        engine.generate(requests, frozenset())
    # Before, a failed compiled capture turned the compiler off for good; memory is not its fault.
    assert engine.compile and engine.last_oom is not None and engine.last_oom.phase == "decode"

    fresh = _graph_engine(captioner, fail_rows=4)
    with torch.inference_mode():
        fresh.warm_up(fresh.plan(requests)[0], 4)
    assert fresh.compile and fresh.max_slots == 2  # half the rows, as for any other
    assert fresh.oom_events == 1
    assert vars(fresh.last_oom) | {"when": 0} == {
        "when": 0,
        "phase": "capture",
        "rows": 4,
        "action": "warming up with at most 2 rows",
    }
    assert sorted(k[0] for k in fresh._graphs) == [1, 2]
    assert _run(fresh, requests[:3]) == expected[:3]

    nothing = _graph_engine(captioner, fail_rows=1)
    nothing.max_slots = 1
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError, match="warming up one row"):
        nothing.warm_up(nothing.plan(requests)[0], 1)
