"""Generation on the tiny checkpoint: batching, stop tokens, sampling, the LongRoPE switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from phicapd.caption_text import clean_caption
from phicapd.captioner import Caption, CaptionRequest
from phicapd.errors import CaptionError
from phicapd.model.captioner import Phi3VCaptioner, build_batch
from phicapd.model.generation import (
    SamplingConfig,
    decode_step,
    generate,
    needs_recompute,
    prefill,
    recompute_step,
    select_next,
)
from phicapd.model.processing import preprocess_image
from phicapd.model.testmodel import make_test_model
from tests.model.helpers import make_captioner, noise_image


def _requests() -> list[CaptionRequest]:
    images = [
        noise_image(500, 300, 60),
        noise_image(200, 700, 30),
        Image.new("RGB", (64, 48), (200, 30, 30)),
    ]
    prompts = ["Describe this image.", "What is the main subject?", "Describe the image in detail, including the sky."]
    return [
        CaptionRequest(image=i, prompt=p, max_new_tokens=n)
        for i, p, n in zip(images, prompts, (16, 9, 24), strict=True)
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_equals_one_at_a_time(tiny_checkpoint: Path, attn: str):
    captioner = make_captioner(tiny_checkpoint, attn_implementation=attn, strip_openers=[])
    requests = _requests()
    batched = captioner.caption(requests)
    single = [captioner.caption([r])[0] for r in requests]
    assert batched == single
    assert [c.new_tokens for c in batched] == [16, 9, 24]  # random weights never say <|end|> here
    assert len({c.text for c in batched}) == 3


def test_token_ids_batched_equal_single(tiny_checkpoint: Path):
    captioner = make_captioner(tiny_checkpoint)
    model, tok = captioner.model, captioner.tokenizer
    requests = _requests()
    images = [captioner.prepare(r.image) for r in requests]

    def run(idx: list[int]) -> list[list[int]]:
        inputs = build_batch(tok, [images[i] for i in idx], [requests[i].prompt for i in idx])
        with torch.inference_mode():
            embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
            return generate(model.language_model, embeds, inputs.attention_mask, [12] * len(idx), frozenset(), 0)

    assert run([0, 1, 2]) == run([0]) + run([1]) + run([2])


def _force_first_token(captioner: Phi3VCaptioner, token_id: int) -> None:
    """Make ``token_id`` win the first greedy step: copy the natural winner's lm_head row, scaled up."""
    request = _requests()[0]
    first = captioner.caption([CaptionRequest(request.image, request.prompt, 1)])[0]
    assert first.new_tokens == 1
    inputs = build_batch(captioner.tokenizer, [captioner.prepare(request.image)], [request.prompt])
    with torch.inference_mode():
        embeds = captioner.model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        logits, _ = prefill(captioner.model.language_model, embeds, inputs.attention_mask)
        winner = int(logits.argmax())
        head = captioner.model.language_model.lm_head.weight
        head[token_id] = 3 * head[winner]


@pytest.mark.parametrize("stop", ["<|end|>", "<|endoftext|>"])
def test_stops_on_end_tokens(tiny_checkpoint: Path, stop: str):
    captioner = make_captioner(tiny_checkpoint)
    stop_id = captioner.tokenizer.token_id(stop)
    assert stop_id in captioner.tokenizer.stop_ids
    _force_first_token(captioner, stop_id)
    request = _requests()[0]
    assert captioner.caption([request]) == [Caption(text="", new_tokens=0)]


def test_stop_ends_only_its_own_row(tiny_checkpoint: Path):
    captioner = make_captioner(tiny_checkpoint)
    model, tok = captioner.model, captioner.tokenizer
    requests = _requests()
    images = [captioner.prepare(r.image) for r in requests]
    inputs = build_batch(tok, images, [r.prompt for r in requests])
    with torch.inference_mode():
        embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        free = generate(model.language_model, embeds, inputs.attention_mask, [10] * 3, frozenset(), tok.pad_id)
        stop = free[1][4]  # stop row 1 at its 5th token; other rows may or may not use that token
        stopped = generate(model.language_model, embeds, inputs.attention_mask, [10] * 3, frozenset({stop}), 0)
    for row, out in zip(free, stopped, strict=True):
        cut = row.index(stop) if stop in row else len(row)
        assert out == row[:cut]
    assert len(stopped[1]) <= 4


def test_max_new_tokens_zero_and_bad_prompt(tiny_checkpoint: Path):
    captioner = make_captioner(tiny_checkpoint)
    request = _requests()[2]
    assert captioner.caption([CaptionRequest(request.image, request.prompt, 0)]) == [Caption("", 0)]
    with pytest.raises(CaptionError) as err:
        captioner.caption([CaptionRequest(request.image, "<|image_1|> again", 5)])
    assert err.value.code == "caption_bad_prompt" and not err.value.retryable


def test_select_next_greedy_and_sampling():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 0.0]])
    assert select_next(logits, SamplingConfig()).tolist() == [1, 0]
    # top_p this small keeps only the most likely token: sampling degenerates to greedy.
    narrow = SamplingConfig(do_sample=True, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert select_next(logits, narrow).tolist() == [1, 0]
    draws = {
        tuple(select_next(logits, SamplingConfig(do_sample=True, generator=torch.Generator().manual_seed(s))).tolist())
        for s in range(40)
    }
    assert len(draws) > 1  # real sampling explores
    assert all(a in (1, 2, 0, 3) for a, _ in draws)


def test_sampling_is_configurable(tiny_checkpoint: Path):
    captioner = make_captioner(tiny_checkpoint, do_sample=True, temperature=5.0, top_p=1.0)
    torch.manual_seed(0)
    texts = {captioner.caption([_requests()[0]])[0].text for _ in range(3)}
    assert len(texts) > 1


def test_strip_openers_and_status(tiny_checkpoint: Path):
    plain = make_captioner(tiny_checkpoint, strip_openers=[])
    request = _requests()[0]
    text = plain.caption([request])[0].text
    opener = text.split()[0]
    # The model's text as decoded: the scheduler cleans it and drops the opener, for every backend
    # alike (tests/model/test_caption_cleaning.py).
    assert make_captioner(tiny_checkpoint, strip_openers=[opener]).caption([request])[0].text == text
    stripped = clean_caption(text, [opener])
    assert stripped != text and not stripped.startswith(opener)
    plain.engine.reset_stats()
    plain.warm_up()
    # The warm-up caption ran in the cache the daemon's stream uses, not one sized for itself.
    assert plain.engine.stats["images"] == 1
    assert plain.engine.pool.tokens >= plain.engine.ctx_for(plain.typical_ctx())
    info = plain.describe()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["parameters"] > 100_000
    assert plain.identity == str(tiny_checkpoint) and plain.max_batch == 16  # the CPU's default
    assert make_captioner(tiny_checkpoint, max_batch=5).max_batch == 5
    plain.close()
    assert plain.describe()["closed"] is True
    with pytest.raises(CaptionError):
        plain.caption([request])


# -- the LongRoPE short -> long switch ------------------------------------------------------


def _oracle(captioner: Phi3VCaptioner, request: CaptionRequest, steps: int) -> list[int]:
    """Greedy without a cache: every step re-runs the whole sequence, as the reference does after the switch."""
    lm = captioner.model.language_model
    inputs = build_batch(captioner.tokenizer, [captioner.prepare(request.image)], [request.prompt])
    out: list[int] = []
    with torch.inference_mode():
        embeds = captioner.model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        for _ in range(steps):
            token = int(lm(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return out


@pytest.fixture(scope="module")
def boundary(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint whose LongRoPE switch sits 3 tokens after the first request's prompt."""
    requests = _requests()
    probe = make_captioner(tiny_checkpoint)
    inputs = build_batch(probe.tokenizer, [probe.prepare(r.image) for r in requests], [r.prompt for r in requests])
    lengths = inputs.attention_mask.sum(-1).tolist()
    limit = lengths[0] + 3
    assert lengths[1] < limit - 20 and lengths[2] > limit  # one row crosses late, one starts long
    path = make_test_model(tmp_path_factory.mktemp("boundary"), original_max_position_embeddings=limit)
    return make_captioner(path), requests, limit


def test_generation_across_the_longrope_switch_matches_full_recompute(boundary):
    captioner, requests, _ = boundary
    model = captioner.model
    inputs = build_batch(
        captioner.tokenizer, [captioner.prepare(r.image) for r in requests], [r.prompt for r in requests]
    )
    with torch.inference_mode():
        embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        cached = generate(model.language_model, embeds, inputs.attention_mask, [30] * 3, frozenset(), 0)
    assert cached == [_oracle(captioner, r, 30) for r in requests]
    # The same through the captioner, batched and one at a time.
    requests = [CaptionRequest(r.image, r.prompt, 30) for r in requests]
    assert captioner.caption(requests) == [captioner.caption([r])[0] for r in requests]


def test_the_switch_really_changes_the_logits(boundary):
    """Guard against a vacuous boundary test: keeping short-factor keys gives different logits."""
    captioner, requests, limit = boundary
    lm = captioner.model.language_model
    inputs = build_batch(captioner.tokenizer, [captioner.prepare(requests[0].image)], [requests[0].prompt])
    with torch.inference_mode():
        embeds = captioner.model.embed(inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        logits, state = prefill(lm, embeds, inputs.attention_mask)
        while not needs_recompute(lm, state, [True]):
            logits = decode_step(lm, logits.argmax(-1), state)
        assert state.lengths == [limit]
        token = logits.argmax(-1)
        state_copy = prefill(lm, embeds, inputs.attention_mask)[1]
        for fed in state.fed_tokens:
            decode_step(lm, fed, state_copy)
        stale = decode_step(lm, token, state)
        fresh = recompute_step(lm, token, state_copy)
    assert state_copy.long_rope == [True]
    assert (stale - fresh).abs().max() > 1e-2


def test_crops_are_prepared_in_the_vision_towers_dtype(tiny_checkpoint: Path):
    """bf16 crops made off the GPU thread give exactly what CLIP's own cast of fp32 crops gives."""
    captioner = make_captioner(tiny_checkpoint, dtype="bfloat16")
    image = _requests()[0].image
    prepared = captioner.prepare(image)
    assert prepared.crops.dtype == torch.bfloat16
    fp32 = preprocess_image(image, captioner.settings.num_crops)
    assert fp32.crops.dtype == torch.float32
    model = captioner.model
    with torch.inference_mode():
        ours = model.crop_features(prepared.crops, [prepared.grid])
        theirs = model.crop_features(fp32.crops, [fp32.grid])
    assert torch.equal(ours, theirs)
