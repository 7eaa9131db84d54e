"""The HD crop transform and token counts against the facts in phi3v.md §3."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from phicapd.model.processing import (
    CLIP_MEAN,
    CLIP_STD,
    CROP,
    collate_images,
    hd_size_for,
    hd_transform,
    num_image_tokens_for_size,
    preprocess_image,
    to_normalized_tensor,
)
from tests.model.helpers import noise_image

WHITE = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])


def noise(width: int, height: int) -> Image.Image:
    return noise_image(width, height)


@pytest.mark.parametrize(
    ("size", "num_crops", "hd", "tokens"),
    [
        ((500, 300), 4, (672, 672), 757),  # verified on the reference processor
        ((200, 700), 4, (1008, 336), 625),  # portrait, verified
        ((600, 400), 16, (1008, 1344), 1921),  # 3 x 4 = 12 tiles
        ((512, 512), 4, (672, 672), 757),
        ((512, 512), 16, (1344, 1344), 2509),
        ((40, 40), 1, (336, 336), 313),  # the minimum
    ],
)
def test_hd_size_and_token_count(size, num_crops, hd, tokens):
    assert hd_size_for(*size, num_crops) == hd
    assert num_image_tokens_for_size(*size, num_crops) == tokens
    processed = preprocess_image(noise(*size), num_crops)
    assert processed.hd_size == hd
    assert processed.num_tokens == tokens


def test_600x400_at_16_crops_gives_12_tiles():
    processed = preprocess_image(noise(600, 400), 16)
    assert processed.grid == (3, 4)
    assert processed.crops.shape == (1 + 12, 3, CROP, CROP)
    assert processed.crops.dtype == torch.float32


def test_landscape_pads_height_white_centred():
    # 500x300 at 4 crops: resized to 672x403, padded to 672 with 134 rows on top, 135 below.
    padded = hd_transform(Image.new("RGB", (500, 300), (0, 0, 0)), 4)
    assert padded.size == (672, 672)
    assert padded.getpixel((300, 133)) == (255, 255, 255)
    assert padded.getpixel((300, 134)) == (0, 0, 0)
    assert padded.getpixel((300, 134 + 402)) == (0, 0, 0)
    assert padded.getpixel((300, 134 + 403)) == (255, 255, 255)


def test_portrait_is_transposed_so_padding_lands_left_and_right():
    # 200x700 -> transposed 700x200 -> 1008x288 + 24/24 rows -> transposed back: 336 wide.
    padded = hd_transform(Image.new("RGB", (200, 700), (0, 0, 0)), 4)
    assert padded.size == (336, 1008)
    assert padded.getpixel((23, 500)) == (255, 255, 255)
    assert padded.getpixel((24, 500)) == (0, 0, 0)
    assert padded.getpixel((24 + 287, 500)) == (0, 0, 0)
    assert padded.getpixel((24 + 288, 500)) == (255, 255, 255)


def test_portrait_transpose_is_an_axis_swap_not_a_rotation():
    # A portrait and its transpose produce transposed HD tensors.
    image = noise(200, 700)
    a = to_normalized_tensor(hd_transform(image, 4))
    b = to_normalized_tensor(hd_transform(image.transpose(Image.Transpose.TRANSPOSE), 4))
    assert torch.equal(a, b.transpose(1, 2))


def test_normalisation_matches_clip_constants():
    tensor = to_normalized_tensor(Image.new("RGB", (2, 2), (255, 255, 255)))
    assert torch.allclose(tensor[:, 0, 0], WHITE)
    black = to_normalized_tensor(Image.new("RGB", (2, 2), (0, 0, 0)))
    assert torch.allclose(black[:, 1, 1], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def test_tiles_are_row_major_slices_and_global_view_includes_padding():
    image = noise(600, 400)
    processed = preprocess_image(image, 16)
    hd = to_normalized_tensor(hd_transform(image, 16))
    h, w = processed.grid
    for r in range(h):
        for c in range(w):
            tile = hd[:, r * CROP : (r + 1) * CROP, c * CROP : (c + 1) * CROP]
            assert torch.equal(processed.crops[1 + r * w + c], tile)
    expected = torch.nn.functional.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    assert torch.equal(processed.crops[0], expected[0])
    # The white padding rows (top of the HD image) survive into the global view.
    assert torch.allclose(processed.crops[0][:, 0, CROP // 2], WHITE, atol=1e-4)


def test_collate_zero_pads_to_the_requested_slots():
    images = [preprocess_image(noise(500, 300), 4), preprocess_image(noise(200, 700), 4)]
    batch = collate_images(images, slots=5)
    assert batch.pixel_values.shape == (2, 5, 3, CROP, CROP)
    assert batch.image_sizes.tolist() == [[672, 672], [1008, 336]]
    assert batch.image_sizes.dtype == torch.long
    assert batch.num_tokens == [757, 625]
    assert torch.equal(batch.pixel_values[1, :4], images[1].crops)
    assert not batch.pixel_values[1, 4].any()
    # Default: pad only to the largest image of the batch.
    assert collate_images(images).pixel_values.shape[1] == 5
    assert collate_images(images[1:]).pixel_values.shape[1] == 4
    with pytest.raises(ValueError):
        collate_images(images, slots=4)


def test_non_rgb_input_is_converted():
    gray = Image.new("L", (300, 300), 255)
    assert torch.allclose(preprocess_image(gray, 1).crops[1][:, 5, 5], WHITE)
