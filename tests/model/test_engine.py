"""The static-cache engine on the tiny checkpoint: same tokens as the simple loop, however batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from phicapd.captioner import CaptionRequest
from phicapd.errors import CaptionError
from phicapd.model.captioner import Phi3VCaptioner, build_batch
from phicapd.model.configuration import parse_config
from phicapd.model.engine import EngineRequest, GenerationEngine, _ListFeed, kv_bytes_per_token
from phicapd.model.generation import generate
from phicapd.model.testmodel import make_test_model
from phicapd.model.tokenizer import build_prompt
from tests.model.helpers import REAL_CONFIG, make_captioner, noise_image

PROMPTS = ["Describe this image.", "What is the main subject?", "Describe the image in detail, including the sky."]


def _images() -> list[Image.Image]:
    return [
        noise_image(500, 300, 60),
        noise_image(200, 700, 30),
        Image.new("RGB", (64, 48), (200, 30, 30)),
        noise_image(336, 336, 7),
        noise_image(900, 200, 8),
    ]


def _engine_requests(captioner: Phi3VCaptioner, budgets: list[int]) -> list[EngineRequest]:
    tok = captioner.tokenizer
    out = []
    for i, (image, budget) in enumerate(zip(_images(), budgets, strict=False)):
        prepared = captioner.prepare(image)
        ids = tok.encode_prompt(build_prompt(PROMPTS[i % 3]), [prepared.num_tokens])
        out.append(EngineRequest(ids, prepared, budget))
    return out


def _simple_loop(captioner: Phi3VCaptioner, requests: list[EngineRequest], stops: frozenset[int]) -> list[list[int]]:
    """The previous generation loop (DynamicCache, left padding), one request at a time."""
    out = []
    for r in requests:
        inputs = build_batch(captioner.tokenizer, [r.image], [PROMPTS[0]])  # only for the pixel tensors
        ids = torch.tensor([list(r.input_ids)])
        with torch.inference_mode():
            embeds = captioner.model.embed(ids, inputs.pixel_values, inputs.image_sizes)
            mask = torch.ones_like(ids)
            out += generate(captioner.model.language_model, embeds, mask, [r.max_new_tokens], stops, 0)
    return out


def _run(engine: GenerationEngine, requests: list[EngineRequest], stops: frozenset[int] = frozenset()):
    with torch.inference_mode():
        return engine.generate(requests, stops)


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Phi3VCaptioner:
    return make_captioner(tiny_checkpoint, strip_openers=[])


@pytest.fixture(scope="module")
def reference(captioner: Phi3VCaptioner) -> tuple[list[EngineRequest], list[list[int]]]:
    requests = _engine_requests(captioner, [14, 9, 20, 1, 17])
    return requests, _simple_loop(captioner, requests, frozenset())


@pytest.mark.parametrize(
    ("slots", "pad_to_bucket", "pool_tokens"),
    [
        (8, False, None),  # everything in one batch
        (2, False, None),  # continuous batching: finished rows hand their slot to the next image
        (8, True, None),  # decode at CUDA-graph bucket sizes: idle rows must not disturb live ones
        (8, False, 2048),  # a pool too small for all rows: slots come from the memory available
    ],
)
def test_engine_equals_the_simple_loop(captioner, reference, slots, pad_to_bucket, pool_tokens):
    requests, expected = reference
    engine = GenerationEngine(captioner.model, max_slots=slots, pad_to_bucket=pad_to_bucket, pool_tokens=pool_tokens)
    assert _run(engine, requests) == expected
    assert [len(t) for t in expected] == [14, 9, 20, 1, 17]
    info = engine.describe()
    assert info["images"] == 5 and info["oom_events"] == 0
    if pool_tokens is not None:
        assert info["kv_pool_tokens"] == 2048  # 1024-token rows: two at a time
    # Continuous batching really ran: more than one prefill group for five images.
    assert info["prefills"] > 1 or (slots == 8 and pool_tokens is None)


def test_batched_equals_single_token_for_token(captioner, reference):
    requests, _ = reference
    engine = GenerationEngine(captioner.model, max_slots=8)
    batched = _run(engine, requests)
    single = [_run(engine, [r])[0] for r in requests]
    assert batched == single
    assert len({tuple(t) for t in batched}) == 5


def test_stops_end_only_their_row(captioner, reference):
    requests, expected = reference
    stop = expected[2][5]  # row 2's sixth token; rows that also produce it stop there too
    engine = GenerationEngine(captioner.model, max_slots=2)
    stopped = _run(engine, requests, frozenset({stop}))
    for free, out in zip(expected, stopped, strict=True):
        assert out == (free[: free.index(stop)] if stop in free else free)
    assert len(stopped[2]) <= 5


def test_zero_budget_and_decode_step_traces(captioner, reference):
    requests, expected = reference
    engine = GenerationEngine(captioner.model, max_slots=4)
    zero = [EngineRequest(r.input_ids, r.image, 0) for r in requests[:2]]
    assert _run(engine, zero) == [[], []]
    assert engine.describe()["calls"] == 0
    # The decode step compiles as one graph (fullgraph=True) with in-place cache writes; the
    # aot_eager backend checks tracing and functionalisation without a C++ compile.
    compiled = GenerationEngine(captioner.model, max_slots=4, compile=True, compile_backend="aot_eager")
    assert _run(compiled, requests[:3]) == expected[:3]


def test_kv_bytes_per_token_full_size():
    config = parse_config(REAL_CONFIG)
    assert kv_bytes_per_token(config.text, torch.bfloat16) == 393_216  # 2 * 32 layers * 3072 * 2 bytes


# -- the LongRoPE switch --------------------------------------------------------------------


def test_engine_across_the_longrope_switch(tiny_checkpoint: Path, tmp_path: Path):
    """Rows crossing the switch mid-caption and a row that starts long, batched and one at a time."""
    probe = make_captioner(tiny_checkpoint)
    lengths = [len(r.input_ids) for r in _engine_requests(probe, [1, 1, 1])]
    limit = lengths[0] + 3
    assert lengths[1] < limit - 20 and lengths[2] > limit
    captioner = make_captioner(make_test_model(tmp_path / "ck", original_max_position_embeddings=limit))
    requests = _engine_requests(captioner, [30, 30, 30])
    expected = _simple_loop(captioner, requests, frozenset())
    engine = GenerationEngine(captioner.model, max_slots=2, pad_to_bucket=True)
    assert _run(engine, requests) == expected
    # Row 0 crosses three tokens in, row 2 starts long; row 1 crosses only with a long budget.
    crossing = [n <= limit < n + 30 - 1 for n in lengths]
    assert crossing[0] and not crossing[2]
    assert engine.describe()["recomputes"] == sum(crossing)
    assert [_run(engine, [r])[0] for r in requests] == expected
    # Not vacuous: without the switch (a huge limit) row 0 generates something else.
    engine.limit = 10**9
    assert _run(engine, requests[:1])[0] != expected[0]


# -- out of memory ----------------------------------------------------------------------------


def _fail_decode_while(engine: GenerationEngine, condition) -> list[int]:
    """Make decode steps raise CUDA's out-of-memory error while ``condition(rows)`` holds."""
    calls: list[int] = []
    real = engine._decode

    def decode(rows, tokens, kv_all):
        calls.append(len(rows))
        if condition(len(rows), engine):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(rows, tokens, kv_all)

    engine._decode = decode  # type: ignore[method-assign]
    return calls


def _requests(n: int) -> list[CaptionRequest]:
    return [CaptionRequest(im, PROMPTS[i % 3], 12) for i, im in enumerate(_images()[:n])]


def test_oom_retries_with_fewer_rows(captioner: Phi3VCaptioner, tiny_checkpoint: Path):
    expected = captioner.caption(_requests(4))
    fresh = make_captioner(tiny_checkpoint, strip_openers=[])
    calls = _fail_decode_while(fresh.engine, lambda rows, _: rows > 2)
    assert fresh.caption(_requests(4)) == expected
    info = fresh.describe()["engine"]
    assert info["oom_events"] == 1 and info["max_slots"] == 2  # half the 4 rows that failed
    assert max(calls) > 2  # the failure was hit
    assert info["last_oom"]["phase"] == "decode" and "rows per batch" in info["last_oom"]["action"]

    # Still shrunk right after it; restored once a quiet period has passed.
    assert fresh.caption(_requests(2)) == expected[:2]
    assert fresh.describe()["engine"]["max_slots"] == 2
    fresh.engine.last_oom.when -= 3600
    assert fresh.caption(_requests(2)) == expected[:2]
    assert fresh.describe()["engine"]["max_slots"] == 16
    assert not fresh.engine.regrow(after=0)  # nothing left to restore


def test_oom_then_fewer_crops_then_a_clean_error(tiny_checkpoint: Path):
    captioner = make_captioner(tiny_checkpoint, max_batch=1)  # one row already: nothing to halve
    engine = captioner.engine
    crops_seen: list[int] = []
    real_admit = engine._admit

    def admit(group, kv_all, first):
        crops = group[0].image.crops.shape[0]
        crops_seen.append(crops)
        if crops > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_admit(group, kv_all, first)

    engine._admit = admit  # type: ignore[method-assign]
    request = _requests(1)  # 500x300: a 2x2 grid at num_crops 4, one tile at num_crops 2
    limit = 2
    assert captioner.caption(request)[0].new_tokens == 12
    assert crops_seen == [5, 2]
    info = captioner.describe()["engine"]
    assert info["oom_events"] == 1
    assert info["last_oom"] | {"when": 0} == {
        "when": 0,
        "phase": "prefill",
        "rows": 1,
        "action": "retrying with num_crops 2",
    }

    limit = 0  # nothing fits: the batch fails cleanly, the captioner stays usable
    with pytest.raises(CaptionError) as err:
        captioner.caption(request)
    assert err.value.code == "model_out_of_memory" and err.value.retryable
    assert captioner.describe()["engine"]["oom_events"] == 4  # at num_crops 4, 2 and 1
    limit = 99
    assert captioner.caption(request)[0].new_tokens == 12


def test_rows_in_a_long_cache_attend_over_a_short_span(captioner, reference):
    """A cache sized for the largest image holds smaller ones: steps read only the span they need."""
    requests, expected = reference
    engine = GenerationEngine(captioner.model, max_slots=4)
    longest = max(len(r.input_ids) + r.max_new_tokens for r in requests)
    ctx = engine.ctx_for(4 * longest)
    assert engine.spans(ctx)[0] > longest  # every row fits the first quarter
    spans: list[int] = []
    step = engine._step

    def spy(tokens, positions, long_rope, caches, *tables):
        spans.append(caches[0].shape[2])
        assert len(caches) == 2 * len(engine.lm.model.layers)
        return step(tokens, positions, long_rope, caches, *tables)

    engine._step = spy
    feed = _ListFeed(requests)
    with torch.inference_mode():
        engine.run(feed, ctx, frozenset())
    assert feed.outputs == expected
    assert set(spans) == {engine.spans(ctx)[0]} and spans[0] < ctx


def test_spans_are_quarters_of_the_cache():
    assert GenerationEngine.spans(3072) == [768, 1536, 2304, 3072]
    assert GenerationEngine.spans(2304) == [768, 1280, 1792, 2304]
    assert GenerationEngine.spans(256) == [256]


def test_warm_up_checks_the_compiled_step_against_the_eager_one(captioner, reference):
    requests, expected = reference
    engine = GenerationEngine(captioner.model, max_slots=4, compile=True, compile_backend="aot_eager")
    with torch.inference_mode():
        engine.warm_up(engine.ctx_for(1000), 4)
    assert engine.compile  # it agrees: compiled it stays

    wrong = GenerationEngine(captioner.model, max_slots=4, compile=True, compile_backend="aot_eager")
    compiled = wrong._step

    def miscompiled(*args):
        logits, _ = compiled(*args)
        wrong = logits.flip(-1)  # plausible-looking numbers, wrong ones
        return wrong, wrong.argmax(-1)

    wrong._step = miscompiled
    with torch.inference_mode():
        wrong.warm_up(wrong.ctx_for(1000), 4)
    assert not wrong.compile and wrong._step == wrong._decode_step and wrong.attention == "sdpa"
    assert _run(wrong, requests[:2]) == expected[:2]

    def crashing_backend(graph, example_inputs):
        raise RuntimeError("the compiler crashed")

    broken = GenerationEngine(captioner.model, max_slots=4, compile=True, compile_backend=crashing_backend)
    with torch.inference_mode():
        broken.warm_up(broken.ctx_for(1000), 4)
    assert not broken.compile


@pytest.mark.parametrize(
    ("message", "broken"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA error: uncorrectable ECC error encountered", True),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", False),
        ("CUDA error: out of memory", False),
        ("shape mismatch in the projector", False),
    ],
)
def test_only_sticky_cuda_errors_mean_a_broken_model(message: str, broken: bool):
    from phicapd.model.captioner import _caption_error

    error = _caption_error(RuntimeError(message))
    assert (error.code == "model_broken") is broken
    assert error.retryable
