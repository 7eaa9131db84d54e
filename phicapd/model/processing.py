"""Images -> HD crops, exactly as Phi-3-vision's reference image processor (phi3v.md §3).

Pillow and torch only. The reference resizes with torchvision on PIL images, which is a plain
``PIL.Image.resize`` (bilinear, PIL's own antialias); it pads with torchvision's constant fill,
which is a paste onto a white canvas; ToTensor + Normalize are reproduced op for op so that
pixel values are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

CROP = 336  # CLIP input side; tiles and the global view are CROP x CROP
MERGED_SIDE = 12  # 24x24 CLIP patches merged 2x2
TOKENS_PER_CROP = MERGED_SIDE * MERGED_SIDE
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower."""

    crops: torch.Tensor  # [1 + h*w, 3, 336, 336] (float32, or the vision tower's dtype): global view, tiles
    hd_size: tuple[int, int]  # (P, Q): padded HD height and width in pixels, multiples of 336

    @property
    def grid(self) -> tuple[int, int]:
        return self.hd_size[0] // CROP, self.hd_size[1] // CROP

    @property
    def num_tokens(self) -> int:
        return num_image_tokens(*self.hd_size)


@dataclass(frozen=True)
class ImageBatch:
    """Several processed images in the reference's tensor layout."""

    pixel_values: torch.Tensor  # float32 [n, slots, 3, 336, 336]; slot 0 global; zero padding slots
    image_sizes: torch.Tensor  # long [n, 2] = (P, Q)
    num_tokens: list[int]


def hd_scale(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """The resized (width, height) of the HD transform for a landscape (width >= height) image."""
    ratio = width / height
    scale = 1
    # Largest scale whose tile grid (scale wide, ceil(scale / ratio) high) fits in num_crops.
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    # The reference truncates; max(1, ...) only matters for panoramas the reference crashes on.
    new_h = max(1, int(new_w / ratio))
    return new_w, new_h


def hd_size_for(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(P, Q) of the padded HD image for a raw ``width x height`` image, without touching pixels."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_w, new_h = hd_scale(width, height, num_crops)
    padded_h = math.ceil(new_h / CROP) * CROP
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def num_image_tokens(hd_height: int, hd_width: int) -> int:
    """Placeholder tokens for one image: tile block with a newline per row, glb_GN, global block."""
    h, w = hd_height // CROP, hd_width // CROP
    return (h * w + 1) * TOKENS_PER_CROP + 1 + (h + 1) * MERGED_SIDE


def num_image_tokens_for_size(width: int, height: int, num_crops: int) -> int:
    return num_image_tokens(*hd_size_for(width, height, num_crops))


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize so a whole number of 336 tiles fits in ``num_crops``, then pad the short side white."""
    transposed = image.width < image.height
    if transposed:
        # Portraits are handled as landscapes: swap the axes (not a rotation) and swap back.
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = hd_scale(image.width, image.height, num_crops)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / CROP) * CROP
    top = (padded_h - new_h) // 2
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(image, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """ToTensor (uint8 HWC -> float CHW / 255) then Normalize, in torchvision's op order."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    hwc = data.view(image.height, image.width, 3)
    # One pass to float CHW, then in place: the same arithmetic in half the memory traffic.
    tensor = hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return tensor.div_(255).sub_(mean).div_(std)


def preprocess_image(
    image: Image.Image, num_crops: int, dtype: torch.dtype = torch.float32, *, pin_memory: bool = False
) -> ProcessedImage:
    """One image -> global view + tiles (no zero padding slots; ``collate_images`` adds those).

    The arithmetic is float32 throughout; ``dtype`` is what the crops are stored in (the vision
    tower's own, so the one rounding happens here, off the GPU thread). ``pin_memory`` (CUDA
    only) puts them in page-locked memory, so the prefill's copy to the GPU is asynchronous and
    at full bus speed; torch's caching host allocator reuses those pages image after image.
    """
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    hd = to_normalized_tensor(hd_transform(image.convert("RGB"), num_crops))
    _, p, q = hd.shape
    h, w = p // CROP, q // CROP
    crops = torch.empty(1 + h * w, 3, CROP, CROP, dtype=dtype, pin_memory=pin_memory)
    # The global view is taken from the normalised, padded HD tensor: bicubic, no antialias, fp32.
    crops[0] = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    # Row-major tiles, written straight into place (no intermediate copy).
    crops[1:].view(h, w, 3, CROP, CROP).copy_(hd.view(3, h, CROP, w, CROP).permute(1, 3, 0, 2, 4))
    return ProcessedImage(crops=crops, hd_size=(p, q))


def collate_images(images: Sequence[ProcessedImage], slots: int | None = None) -> ImageBatch:
    """Stack images, zero-padding each to ``slots`` crops (the reference uses num_crops + 1).

    The model reads only the first 1 + h*w slots of each image, so padding to the batch's
    largest image (the default) gives the same result with less memory.
    """
    if not images:
        raise ValueError("collate_images needs at least one image")
    need = max(im.crops.shape[0] for im in images)
    slots = need if slots is None else slots
    if slots < need:
        raise ValueError(f"{slots} slots cannot hold an image with {need} crops")
    pixel_values = torch.zeros(len(images), slots, 3, CROP, CROP, dtype=torch.float32)
    for i, im in enumerate(images):
        pixel_values[i, : im.crops.shape[0]] = im.crops
    sizes = torch.tensor([im.hd_size for im in images], dtype=torch.long)
    return ImageBatch(pixel_values=pixel_values, image_sizes=sizes, num_tokens=[im.num_tokens for im in images])
