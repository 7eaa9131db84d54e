"""Native Phi-3.5-vision: CLIP tower + HD projector + transformers' ``Phi3ForCausalLM``.

One explicit file in the style of transformers' model files, following phi3v.md §4 step by
step. Only the parts transformers does not have are written here: the 2x2 merge, the
``sub_GN``/``glb_GN`` separators, the projector, and scattering image features into the text
embeddings. The language model is used unchanged (its own embedding table is the only one).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionModel, Phi3ForCausalLM

from phicapd.model.configuration import Phi3VConfig
from phicapd.model.processing import ProcessedImage
from phicapd.model.vision_cpu import FusedClipEncoder

CLIP_CHUNK = 64  # crops per CLIP call: bounds activation memory for big batches


class RowwiseRotaryEmbedding(nn.Module):
    """LongRoPE with the short/long choice made per batch row.

    transformers picks short or long factors from ``max(position_ids)`` over the whole call,
    so in a left-padded batch one long row would switch its short neighbours to long factors
    and their outputs would depend on the batch. The reference decides per sequence
    (its length vs ``original_max_position_embeddings``); calling the native module one row at
    a time gives exactly that, with transformers' own arithmetic.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.shape[0] == 1:
            return self.inner(x, position_ids)
        rows = [self.inner(x, position_ids[i : i + 1]) for i in range(position_ids.shape[0])]
        return torch.cat([c for c, _ in rows]), torch.cat([s for _, s in rows])


def vision_tower_config(config: Phi3VConfig):
    """The CLIP config truncated after the feature layer.

    ``hidden_states[layer]`` (layer -2 for Phi-3.5) is the output of encoder layer
    ``num_layers + layer``; later layers are computed and thrown away by the reference, so we
    do not build them and read ``last_hidden_state`` instead (CLIP's post_layernorm only
    touches the pooled output, which we never use).
    """
    vision = copy.deepcopy(config.vision)
    vision.num_hidden_layers = config.vision.num_hidden_layers + config.vision_layer + 1
    return vision


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor ready to copy to ``device``: in page-locked memory for CUDA, so the copy is
    queued on the stream instead of making the host wait for it (a pageable copy does)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, copied asynchronously where that is possible."""
    return pinned(tensor, device).to(device, non_blocking=True)


class Phi3VForCausalLM(nn.Module):
    """Phi-3.5-vision for generation: ``embed`` builds input embeddings, the LM does the rest."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.config = config
        merged = 4 * config.image_dim_out
        hidden = config.text.hidden_size
        self.language_model = Phi3ForCausalLM(config.text)
        self.vision_tower = CLIPVisionModel(vision_tower_config(config))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))  # newline at the end of each row
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))  # between tile block and global block
        self.img_projection = nn.Sequential(nn.Linear(merged, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self._fused_clip: FusedClipEncoder | None = None

    def use_fused_cpu_vision(self) -> None:
        """Run CLIP's layers through ``vision_cpu`` while the tower is on the CPU (call once loaded)."""
        if self._fused_clip is None and self.vision_tower.config.hidden_act == "quick_gelu":
            self._fused_clip = FusedClipEncoder(self.vision_tower)

    def use_rowwise_rope(self) -> None:
        """Install per-row LongRoPE (call once the rotary module holds real buffers)."""
        rotary = self.language_model.model.rotary_emb
        if not isinstance(rotary, RowwiseRotaryEmbedding):
            self.language_model.model.rotary_emb = RowwiseRotaryEmbedding(rotary)

    @property
    def device(self) -> torch.device:
        return self.sub_GN.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sub_GN.dtype

    # -- vision -----------------------------------------------------------------------------

    def merged_crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[n, 3, 336, 336] -> [n, 12, 12, 4*dim]: CLIP patch features (CLS dropped), merged 2x2."""
        feats = torch.cat([self.clip_hidden_states(chunk)[:, 1:] for chunk in crops.split(CLIP_CHUNK)])
        n, patches, dim = feats.shape
        side = int(patches**0.5)
        half = side // 2
        # Token (i, j) concatenates patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
        grid = feats.reshape(n, half, 2, half, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, half, half, 4 * dim)

    def clip_hidden_states(self, crops: torch.Tensor) -> torch.Tensor:
        """The truncated tower's ``last_hidden_state`` for [n, 3, 336, 336] crops."""
        fused = self._fused_clip
        if fused is not None and crops.device.type == "cpu" and self.vision_tower.device.type == "cpu":
            return fused(crops)
        return self.vision_tower(pixel_values=crops).last_hidden_state

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, C] -> [rows * (cols + 1), C] with ``sub_GN`` closing every row."""
        newline = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected image tokens of all images, concatenated in ``pixel_values`` order.

        pixel_values: [n, slots, 3, 336, 336] (slot 0 is the global view); image_sizes: [n, 2]
        padded HD (height, width). Zero padding slots never reach CLIP: the reference runs them
        and discards the result, which is the same numbers at more cost.
        """
        crop = pixel_values.shape[-1]
        grids = [(int(p) // crop, int(q) // crop) for p, q in image_sizes.tolist()]
        valid = torch.cat([pixel_values[k, : 1 + h * w] for k, (h, w) in enumerate(grids)])
        return self.crop_features(valid, grids)

    def crop_features(self, crops: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``image_features`` from the valid crops only: [sum(1 + h*w), 3, 336, 336], images in order."""
        merged = self.merged_crop_features(crops.to(self.device))
        glb = self.glb_GN.reshape(1, -1).to(merged.dtype)
        pieces, start = [], 0
        for h, w in grids:
            crops = merged[start : start + 1 + h * w]
            start += 1 + h * w
            side = crops.shape[1]
            # Tiles laid out row-major into a (side*h) x (side*w) mosaic.
            mosaic = crops[1:].reshape(h, w, side, side, -1).permute(0, 2, 1, 3, 4).reshape(h * side, w * side, -1)
            pieces += [self._with_newlines(mosaic), glb, self._with_newlines(crops[0])]
        tokens = torch.cat(pieces)
        projector = self.img_projection[0]
        return self.img_projection(tokens.to(device=projector.bias.device, dtype=projector.bias.dtype))

    # -- text + images ----------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings with every negative (placeholder) id replaced by an image token.

        The k-th image fills the k-th run of placeholders in row-major (batch, sequence) order.
        """
        image_mask = input_ids < 0
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        if pixel_values is None or image_sizes is None or not bool(image_mask.any()):
            return embeds
        return self.scatter_features(embeds, image_mask, self.image_features(pixel_values, image_sizes))

    def embed_images(self, input_ids: torch.Tensor, images: Sequence[ProcessedImage]) -> torch.Tensor:
        """``embed`` for preprocessed images, without building the zero-padded pixel tensor.

        ``input_ids`` are best given on the host: the placeholder positions are found there, so
        the GPU thread queues the whole prefill without waiting for the device (a boolean-mask
        scatter on the device makes the host wait for the mask's count).
        """
        ids = input_ids.cpu()
        where = (ids < 0).nonzero(as_tuple=True)
        embeds = self.embed_tokens(upload(ids.clamp(min=0), self.device))
        if not images:
            return embeds
        # Each image to the device (asynchronously when pinned), then one concatenation there.
        crops = torch.cat([im.crops.to(self.device, non_blocking=True) for im in images])
        features = self.crop_features(crops, [im.grid for im in images])
        if features.shape[0] != where[0].numel():
            raise ValueError(f"{where[0].numel()} image placeholder tokens but {features.shape[0]} image features")
        return embeds.index_put(tuple(upload(w, self.device) for w in where), features.to(embeds.dtype))

    @staticmethod
    def scatter_features(embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Overwrite the placeholder positions (row-major) with the image tokens, in order."""
        if features.shape[0] != int(image_mask.sum()):
            raise ValueError(f"{int(image_mask.sum())} image placeholder tokens but {features.shape[0]} image features")
        return embeds.index_put((image_mask,), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-sequence logits (float32, like the reference) for parity checks and tests."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.logits.float()
