"""A tiny random-weight Phi-3.5-vision checkpoint in Microsoft's exact on-disk layout.

Tests, CI and users smoke-test an installation with it instead of the 8 GB download. It is
written from the published format (phi3v.md §1, §2, §3, §5), never from our model classes, so
loading it checks our key mapping against the official names. The product has no special case
for it: it is just a small ``phi3_v`` checkpoint whose special tokens have small ids.

Usage: ``python -m phicapd.model.testmodel DIR`` (the daemon CLI exposes ``phicapd make-test-model``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from phicapd.model.processing import CLIP_MEAN, CLIP_STD

HEAD_DIM = 16
TINY_CONFIG: dict[str, Any] = {
    "_name_or_path": "phicapd/tiny-random-phi-3.5-vision",
    "architectures": ["Phi3VForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "img_processor": {
        "image_dim_out": 32,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "original_max_position_embeddings": 4096,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    # Not in Microsoft's file (the reference hard-codes ViT-L/14-336); lets a checkpoint be tiny.
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
    },
}

# Special tokens in Microsoft's order (32000..32044 in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    *(f"<|placeholder{i}|>" for i in range(1, 5)),
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
    *(f"<|placeholder{i}|>" for i in range(7, 40)),
    "<|image|>",
]
RSTRIP_TOKENS = {"<|assistant|>"} | {f"<|placeholder{i}|>" for i in range(1, 40)}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)
WORDS = [
    *("the", "a", "an", "of", "in", "on", "and", "with", "is", "are", "this", "image", "photo"),
    *("picture", "shows", "describe", "detail", "including", "main", "subject", "actions", "setting"),
    *("cat", "dog", "man", "woman", "person", "red", "blue", "green", "white", "black", "sky", "road"),
]


# -- tokenizer -------------------------------------------------------------------------------


def build_tokenizer() -> Tokenizer:
    """A Llama-style SentencePiece BPE with byte fallback, Phi-3's normalizer and special tokens."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = "▁"
        for ch in word:
            merged = piece + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((piece, ch))
            piece = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>")])
    tok.add_tokens([AddedToken("</s>", normalized=False, special=False)])
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True, rstrip=t in RSTRIP_TOKENS) for t in SPECIAL_TOKENS]
    )
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    decoder = {}
    for token in ("<unk>", "<s>", "</s>", *SPECIAL_TOKENS):
        decoder[str(tok.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": token in RSTRIP_TOKENS,
            "single_word": False,
            "special": token != "</s>",
        }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


# -- weights ---------------------------------------------------------------------------------


def official_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key and shape of a phi3_v checkpoint, from the published key list (§2)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = hidden // heads
    vocab = config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv_heads) * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)

    v = config.get("vision_config") or {}
    vd, vi = v.get("hidden_size", 1024), v.get("intermediate_size", 4096)
    grid = v.get("image_size", 336) // v.get("patch_size", 14)
    patch = v.get("patch_size", 14)
    c = "model.vision_embed_tokens.img_processor.vision_model."
    shapes[c + "embeddings.class_embedding"] = (vd,)
    shapes[c + "embeddings.patch_embedding.weight"] = (vd, 3, patch, patch)
    shapes[c + "embeddings.position_embedding.weight"] = (grid * grid + 1, vd)
    shapes[c + "pre_layrnorm.weight"] = shapes[c + "pre_layrnorm.bias"] = (vd,)
    for i in range(v.get("num_hidden_layers", 24)):
        p = f"{c}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (vd, vd)
            shapes[f"{p}self_attn.{proj}.bias"] = (vd,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (vd,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (vi, vd), (vi,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (vd, vi), (vd,)
    shapes[c + "post_layernorm.weight"] = shapes[c + "post_layernorm.bias"] = (vd,)

    merged = 4 * config["img_processor"]["image_dim_out"]
    e = "model.vision_embed_tokens."
    shapes[e + "sub_GN"] = (1, 1, 1, merged)
    shapes[e + "glb_GN"] = (1, 1, merged)
    shapes[e + "img_projection.0.weight"], shapes[e + "img_projection.0.bias"] = (hidden, merged), (hidden,)
    shapes[e + "img_projection.2.weight"], shapes[e + "img_projection.2.bias"] = (hidden, hidden), (hidden,)
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if key.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.startswith("model.vision_embed_tokens.") and not key.endswith(("sub_GN", "glb_GN")):
        return 0.05 * torch.randn(shape, generator=gen)
    if key.startswith("model.layers."):
        # Layers strong enough to make the next token depend on the context, not just on the
        # previous token (weak layers make every caption the same short loop).
        return 0.3 * torch.randn(shape, generator=gen)
    # Embeddings, separators and a large lm_head: greedy argmax is decisive, so batched and
    # single runs cannot flip on float noise.
    return torch.randn(shape, generator=gen)


def make_weights(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
    return {k: _init_tensor(k, s, gen).to(dtype) for k, s in official_shapes(config).items()}


def _write_shards(out_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    # Two shards like Microsoft's: the first LM layers in shard 1, everything else in shard 2.
    first = {k: v for k, v in weights.items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [first, {k: v for k, v in weights.items() if k not in first}]
    weight_map = {}
    # safetensors creates its files 0600; give them the mode (umask) of the JSON files beside them,
    # or a daemon running as another user cannot read the checkpoint it was pointed at.
    mode = stat.S_IMODE((out_dir / "config.json").stat().st_mode)
    for name, shard in zip(names, shards, strict=True):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out_dir / name), metadata={"format": "pt"})
        (out_dir / name).chmod(mode)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_test_model(
    out_dir: Path,
    *,
    seed: int = 0,
    num_crops: int = 4,
    processor_code: bool = False,
    full_vision: bool = False,
    word_pieces_only: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny random Phi-3.5-vision checkpoint to ``out_dir`` and return ``out_dir``.

    ``overrides`` replace config.json fields (dicts merge), e.g.
    ``original_max_position_embeddings=300`` to cross the LongRoPE switch in a short test.
    ``processor_code`` adds the processor as remote code (``model/checkpoint_code``), for a
    runtime that loads it with ``trust_remote_code`` (vLLM); phicapd itself never runs it.
    ``full_vision`` gives it Phi-3.5-vision's own vision tower, CLIP ViT-L/14-336 (no
    ``vision_config``, as in Microsoft's file): 300 M random parameters, where the image work
    of the real model is, and the only tower vLLM's Phi3V builds.
    ``word_pieces_only``: greedy decoding never picks a byte-fallback or special token (their
    ``lm_head`` rows are zero), so every runtime's detokenizer writes the same text of the same
    ids (they differ on invalid UTF-8 and on special tokens, which random weights produce).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    base = TINY_CONFIG
    if full_vision:
        base = {k: v for k, v in TINY_CONFIG.items() if k != "vision_config"}
        base = _merge(base, {"img_processor": {"image_dim_out": 1024}})
    config = _merge(base, overrides)
    config.setdefault("vocab_size", math.ceil(tok.get_vocab_size() / 64) * 64)
    config.setdefault("pad_token_id", tok.token_to_id("<|endoftext|>"))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if "rope_scaling" not in config:
        gen = torch.Generator().manual_seed(seed + 1)
        short = (1.0 + torch.rand(head_dim // 2, generator=gen)).tolist()
        # Long factors far from the short ones, so a wrong short/long choice changes the output.
        long = (4.0 + 60.0 * torch.rand(head_dim // 2, generator=gen)).tolist()
        config["rope_scaling"] = {"long_factor": long, "short_factor": short, "type": "su"}

    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    special = {
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    preprocessor = {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "num_crops": num_crops,
        "num_img_tokens": 144,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "Phi3VImageProcessor",
        "processor_class": "Phi3VProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    stops = [tok.token_to_id(t) for t in ("<|end|>", "<|endoftext|>")]
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": stops}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    weights = make_weights(config, seed)
    # A vocabulary set larger than the tokenizer's (vLLM needs <|image|>'s real id, 32044): the rows
    # no token reaches score 0, as untrained rows would, so greedy captions stay in the vocabulary.
    weights["lm_head.weight"][math.ceil(tok.get_vocab_size() / 64) * 64 :] = 0
    if word_pieces_only:
        unwordly = ["<unk>", "<s>", "</s>", *SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]
        weights["lm_head.weight"][[tok.token_to_id(t) for t in unwordly]] = 0
    _write_shards(out_dir, weights)
    if processor_code:
        write_processor_code(out_dir)
    return out_dir


def write_processor_code(out_dir: Path) -> None:
    """Copy phicapd's ``Phi3VConfig`` and ``Phi3VProcessor`` (with the image transform it uses)
    into a checkpoint: the files config.json's and preprocessor_config.json's ``auto_map`` name."""
    here = Path(__file__).resolve().parent
    for name in ("configuration_phi3_v.py", "processing_phi3_v.py"):
        shutil.copyfile(here / "checkpoint_code" / name, out_dir / name)
    shutil.copyfile(here / "processing.py", out_dir / "phicapd_processing.py")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phicapd make-test-model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processor-code",
        action="store_true",
        help="add config and processor code (for vLLM's --trust-remote-code)",
    )
    args = parser.parse_args(argv)
    path = make_test_model(args.dir, seed=args.seed, processor_code=args.processor_code)
    print(f"wrote a tiny random Phi-3.5-vision checkpoint to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
