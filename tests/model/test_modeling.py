"""The vision path and the forward pass against an independent re-implementation of phi3v.md §4."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from phicapd.model.configuration import read_config
from phicapd.model.modeling import Phi3VForCausalLM, RowwiseRotaryEmbedding
from phicapd.model.processing import collate_images, preprocess_image
from phicapd.model.tokenizer import Phi3VTokenizer, build_prompt
from tests.model.helpers import noise_image

PREFIX = "model.vision_embed_tokens."


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in model_dir.glob("*.safetensors"):
        out.update({k: v.float() for k, v in load_file(shard).items()})
    return out


def _full_clip(model_dir: Path, weights: dict[str, torch.Tensor]) -> CLIPVisionModel:
    """All CLIP layers, as the reference builds it (nothing truncated)."""
    config = read_config(model_dir).vision
    config._attn_implementation = "eager"
    clip = CLIPVisionModel(config).eval()
    own = clip.state_dict().keys()
    state = {}
    for key, value in weights.items():
        if key.startswith(PREFIX + "img_processor."):
            rest = key[len(PREFIX + "img_processor.") :]
            state[rest if rest in own else rest.removeprefix("vision_model.")] = value
    clip.load_state_dict(state)
    return clip


def reference_image_features(model_dir: Path, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """phi3v.md §4 steps 3-9 written out plainly: every slot through CLIP, then select."""
    weights = _weights(model_dir)
    clip = _full_clip(model_dir, weights)
    n, slots = pixel_values.shape[:2]
    with torch.no_grad():
        hidden = clip(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    patches = hidden[:, 1:].reshape(n, slots, 24, 24, -1)
    sub, glb = weights[PREFIX + "sub_GN"].reshape(-1), weights[PREFIX + "glb_GN"].reshape(-1)

    def merged(crop: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return torch.cat(
            [crop[2 * i, 2 * j], crop[2 * i, 2 * j + 1], crop[2 * i + 1, 2 * j], crop[2 * i + 1, 2 * j + 1]]
        )

    rows = []
    for k in range(n):
        h, w = (int(v) // 336 for v in image_sizes[k])
        for r in range(12 * h):  # tile mosaic, a newline after each row
            for c in range(12 * w):
                tile = 1 + (r // 12) * w + c // 12
                rows.append(merged(patches[k, tile], r % 12, c % 12))
            rows.append(sub)
        rows.append(glb)
        for r in range(12):  # global view
            rows.extend(merged(patches[k, 0], r, c) for c in range(12))
            rows.append(sub)
    x = torch.stack(rows)
    x = F.linear(x, weights[PREFIX + "img_projection.0.weight"], weights[PREFIX + "img_projection.0.bias"])
    x = F.gelu(x)
    return F.linear(x, weights[PREFIX + "img_projection.2.weight"], weights[PREFIX + "img_projection.2.bias"])


def _images() -> list[Image.Image]:
    return [noise_image(500, 300, 60), noise_image(200, 700, 40)]


def test_vision_path_matches_plain_reimplementation(tiny_checkpoint: Path, tiny_model: Phi3VForCausalLM):
    images = [preprocess_image(im, 4) for im in _images()]
    batch = collate_images(images, slots=5)  # reference layout: num_crops + 1 slots, zero padded
    assert batch.num_tokens == [757, 625]
    expected = reference_image_features(tiny_checkpoint, batch.pixel_values, batch.image_sizes)
    with torch.no_grad():
        got = tiny_model.image_features(batch.pixel_values, batch.image_sizes)
    assert got.shape == expected.shape == (757 + 625, tiny_model.config.text.hidden_size)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


def test_padding_slots_change_nothing(tiny_model: Phi3VForCausalLM):
    images = [preprocess_image(im, 4) for im in _images()]
    with torch.no_grad():
        tight = collate_images(images)
        padded = collate_images(images, slots=17)
        padded.pixel_values[:, 5:] = 7.0  # garbage in unused slots must not matter either
        a = tiny_model.image_features(tight.pixel_values, tight.image_sizes)
        b = tiny_model.image_features(padded.pixel_values, padded.image_sizes)
    assert torch.equal(a, b)


def test_images_fill_placeholders_in_order(tiny_model: Phi3VForCausalLM, tiny_tokenizer: Phi3VTokenizer):
    images = [preprocess_image(im, 4) for im in _images()]
    batch = collate_images(images)
    ids = torch.tensor([tiny_tokenizer.encode_prompt(build_prompt("Compare.", 2), batch.num_tokens)])
    with torch.no_grad():
        embeds = tiny_model.embed(ids, batch.pixel_values, batch.image_sizes)
        features = tiny_model.image_features(batch.pixel_values, batch.image_sizes)
        text = tiny_model.embed_tokens(ids.clamp(min=0))
    assert torch.equal(embeds[0][ids[0] == -1], features[:757])
    assert torch.equal(embeds[0][ids[0] == -2], features[757:])
    assert torch.equal(embeds[0][ids[0] >= 0], text[0][ids[0] >= 0])
    logits = tiny_model(ids, batch.pixel_values, batch.image_sizes)
    assert logits.shape == (1, ids.shape[1], tiny_model.config.text.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_rowwise_rope_equals_native_per_row(tiny_model: Phi3VForCausalLM):
    rotary = tiny_model.language_model.model.rotary_emb
    assert isinstance(rotary, RowwiseRotaryEmbedding)
    x = torch.zeros(1, dtype=torch.float32)
    limit = tiny_model.config.text.original_max_position_embeddings
    short_row = torch.arange(0, 100)[None]
    long_row = torch.arange(limit - 99, limit + 1)[None]  # max position = limit -> length limit + 1
    cos, sin = rotary(x, torch.cat([short_row, long_row]))
    for i, row in enumerate((short_row, long_row)):
        c, s = rotary.inner(x, row)
        assert torch.equal(cos[i], c[0]) and torch.equal(sin[i], s[0])
    # The native module alone would give the short row long factors here.
    native_cos, _ = rotary.inner(x, torch.cat([short_row, long_row]))
    assert not torch.allclose(native_cos[0], cos[0])


def test_processor_call_matches_reference_layout(tiny_checkpoint: Path, tiny_model: Phi3VForCausalLM):
    from phicapd.model.processor import Phi3VProcessor

    processor = Phi3VProcessor.from_dir(tiny_checkpoint)
    assert processor.num_crops == 4  # from preprocessor_config.json
    inputs = processor(build_prompt("Compare.", 2), _images())
    assert inputs["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == [[672, 672], [1008, 336]]
    ids = inputs["input_ids"][0]
    assert (ids == -1).sum() == 757 and (ids == -2).sum() == 625
    assert (ids == processor.tokenizer.bos_id).sum() == 3
    assert inputs["attention_mask"].all()
    text_only = processor(build_prompt("Hi", 0))
    assert set(text_only) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**text_only)).all()
