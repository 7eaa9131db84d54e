"""The processor and config a test checkpoint carries for vLLM (``make_test_model(processor_code=True)``)
give exactly the inputs phicapd's native engine builds: the same token ids, the same crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from phicapd.model.processing import preprocess_image
from phicapd.model.testmodel import make_test_model
from phicapd.model.tokenizer import Phi3VTokenizer, build_prompt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("remote-code"), processor_code=True)


def test_the_checkpoint_carries_the_files_its_auto_map_names(checkpoint: Path) -> None:
    assert (checkpoint / "configuration_phi3_v.py").is_file()
    assert (checkpoint / "processing_phi3_v.py").is_file()
    assert (checkpoint / "phicapd_processing.py").read_bytes() == (
        Path(__file__).resolve().parents[2] / "phicapd" / "model" / "processing.py"
    ).read_bytes()


def test_the_config_reads_microsofts_fields(checkpoint: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    assert config.model_type == "phi3_v"
    assert config.img_processor["num_img_tokens"] == 144
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("name, size", [("coffee.png", None), ("portrait", (200, 700))])
def test_the_processor_gives_the_native_engines_inputs(
    checkpoint: Path, test_images_dir: Path, name: str, size: tuple[int, int] | None
) -> None:
    processor = transformers.AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True, num_crops=4)
    image = Image.new("RGB", size, (10, 200, 30)) if size else Image.open(test_images_dir / name).convert("RGB")
    prompt = build_prompt("Describe this image.")
    out = processor(text=prompt, images=[image])

    native = preprocess_image(image, 4)
    tokenizer = Phi3VTokenizer.from_dir(checkpoint)
    assert out["input_ids"][0].tolist() == tokenizer.encode_prompt(prompt, [native.num_tokens])
    assert out["attention_mask"].min() == 1
    assert tuple(out["image_sizes"][0].tolist()) == native.hd_size
    assert processor.calc_num_image_tokens_from_image_size(*image.size) == native.num_tokens
    assert processor.img_tokens[0] == "<|image_1|>"
    pixels = out["pixel_values"][0]
    assert pixels.shape == (5, 3, 336, 336)  # num_crops + 1 slots, zero padded
    assert torch.equal(pixels[: native.crops.shape[0]], native.crops)
    assert not pixels[native.crops.shape[0] :].any()
