"""Checkpoint layout, key mapping and loading (phi3v.md §1, §2)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phicapd.config import ModelSettings
from phicapd.errors import ConfigError, ModelUnavailable, PhicapError
from phicapd.model.configuration import parse_config
from phicapd.model.loading import (
    DOWNLOAD_PATTERNS,
    CheckpointError,
    build_model,
    checkpoint_files,
    download_model,
    key_map_for,
    plan_load,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from phicapd.model.testmodel import make_test_model, official_shapes
from tests.model.helpers import REAL_CONFIG, load_tiny


def test_official_key_list_matches_the_published_checkpoint():
    shapes = official_shapes(REAL_CONFIG)
    assert len(shapes) == 592
    assert sum(math.prod(s) for s in shapes.values()) == 4_146_621_440  # total_size / 2 bytes


def test_the_longrope_factor_is_given_so_transformers_does_not_warn_and_nothing_changes():
    """transformers warns on every start when a longrope dict has no ``factor`` and derives it
    as max / original positions; we give it that very number: same frequencies, same scale."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = parse_config(REAL_CONFIG).text
    assert config.rope_parameters["factor"] == 131072 / 4096
    derived = copy.deepcopy(config)
    del derived.rope_parameters["factor"]
    ours, theirs = ROPE_INIT_FUNCTIONS["longrope"](config), ROPE_INIT_FUNCTIONS["longrope"](derived)
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]


def test_real_config_maps_onto_the_native_model_without_leftovers():
    config = parse_config(REAL_CONFIG)
    assert config.text.rope_parameters["rope_type"] == "longrope"
    assert config.text.rope_parameters["original_max_position_embeddings"] == 4096
    assert config.vision.hidden_size == 1024 and config.vision.num_hidden_layers == 24
    model = build_model(config, "eager")  # meta device: shapes only
    shapes = official_shapes(REAL_CONFIG)
    plan = plan_load(model, shapes)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {plan[k]: shapes[k] for k in plan} == model_shapes
    # Only the CLIP layer after the feature layer (index 23) is not loaded.
    skipped = set(shapes) - set(plan)
    assert skipped and all(".encoder.layers.23." in k for k in skipped)
    assert all(k.startswith("language_model.") for k in (plan[k] for k in shapes if k.startswith("lm_head")))
    assert plan["model.vision_embed_tokens.sub_GN"] == "sub_GN"


def test_no_second_embedding_table():
    model = build_model(parse_config(REAL_CONFIG), "eager")
    embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings > 1000]
    assert embeddings == ["language_model.model.embed_tokens"]


def test_tiny_checkpoint_loads_every_key(tiny_checkpoint: Path):
    files = checkpoint_files(tiny_checkpoint)
    assert len(set(files.values())) == 2  # two shards, read through the index
    model = load_tiny(tiny_checkpoint)
    weights = {}
    for shard in set(files.values()):
        weights.update(load_file(shard))
    mapping = key_map_for(model)
    state = model.state_dict()
    for key, tensor in weights.items():
        target = mapping.target(key)
        if target is not None:
            assert torch.equal(state[target], tensor.float()), key
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_shard(model_dir: Path, edit) -> None:
    """Apply ``edit(tensors)`` to the second shard and rewrite the index to match."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = "model-00002-of-00002.safetensors"
    tensors = load_file(model_dir / shard)
    edit(tensors)
    save_file(tensors, model_dir / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))


def test_renamed_key_fails_naming_both_keys(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    old = "model.vision_embed_tokens.img_projection.0.weight"
    _edit_shard(model_dir, lambda t: t.__setitem__("model.vision_embed_tokens.img_proj.0.weight", t.pop(old)))
    with pytest.raises(CheckpointError) as err:
        load_tiny(model_dir)
    message = str(err.value)
    assert "missing keys (1): img_projection.0.weight" in message
    assert "unexpected keys (1): model.vision_embed_tokens.img_proj.0.weight" in message
    assert err.value.code == "model_checkpoint_invalid"


def test_missing_key_fails(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_shard(model_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): language_model.lm_head.weight"):
        load_tiny(model_dir)


def test_extra_key_fails(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_shard(model_dir, lambda t: t.__setitem__("model.vision_embed_tokens.wte.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model.vision_embed_tokens.wte.weight"):
        load_tiny(model_dir)


def test_wrong_shape_fails(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_shard(model_dir, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_tiny(model_dir)


def test_index_naming_a_missing_shard_fails(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (model_dir / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_tiny(model_dir)


def test_shards_are_found_through_the_index_not_by_name(tiny_checkpoint: Path, tmp_path: Path):
    model_dir = _copy(tiny_checkpoint, tmp_path / "ckpt")
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for i, name in enumerate(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]):
        (model_dir / name).rename(model_dir / f"part{i}.safetensors")
        index["weight_map"] = {k: (f"part{i}.safetensors" if v == name else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    load_tiny(model_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "phi3", "model_type"),
        ("embd_layer", {"hd_transform_order": "glb_sub"}, "hd_transform_order"),
        ("rope_scaling", {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, "rope_scaling"),
        ("rope_scaling", {"type": "su", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}, "short_factor"),
    ],
)
def test_unsupported_configs_fail_with_config_error(tiny_checkpoint, field, value, message):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    raw[field] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises((ConfigError, ModelUnavailable), match="CUDA"):
            resolve_device("cuda")


def test_load_in_bfloat16(tiny_checkpoint: Path):
    from phicapd.model.loading import load_model

    model = load_model(tiny_checkpoint, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # RoPE frequencies stay float32 whatever the weights are.
    assert model.language_model.model.rotary_emb.inner.inv_freq.dtype == torch.float32


def test_download_never_fetches_code():
    assert not any(p.endswith(".py") or p in ("*", "*.*") for p in DOWNLOAD_PATTERNS)


def test_path_setting_is_used_as_is(tiny_checkpoint: Path):
    settings = ModelSettings(path=tiny_checkpoint)
    assert resolve_model_dir(settings) == tiny_checkpoint
    assert download_model(settings) == tiny_checkpoint


def test_not_a_checkpoint_dir(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        resolve_model_dir(ModelSettings(path=tmp_path))


def test_offline_and_not_cached_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="download-model"):
        resolve_model_dir(ModelSettings(id="microsoft/Phi-3.5-vision-instruct"))


def test_loads_from_the_hf_cache_layout(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A cache entry as huggingface_hub writes it: refs/<revision> -> snapshots/<commit>/files.
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-phi3v"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    settings = ModelSettings(id="someone/tiny-phi3v", revision="main")
    assert resolve_model_dir(settings) == repo / "snapshots" / commit


def test_make_test_model_overrides_and_cli(tmp_path: Path):
    from phicapd.model.testmodel import main

    out = make_test_model(tmp_path / "a", original_max_position_embeddings=300, vision_config={"hidden_size": 16})
    raw = json.loads((out / "config.json").read_text())
    assert raw["original_max_position_embeddings"] == 300
    assert raw["vision_config"]["hidden_size"] == 16 and raw["vision_config"]["patch_size"] == 14
    assert raw["rope_scaling"]["type"] == "su" and len(raw["rope_scaling"]["short_factor"]) == 8
    with pytest.raises(PhicapError):
        load_tiny(out)  # image_dim_out (32) no longer matches the tower: a clear ConfigError
    assert main([str(tmp_path / "b")]) == 0
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"} <= names
    assert not any(n.endswith(".py") for n in names)


# -- start-up failures that may go away (exit 75) and those that cannot (exit 78) ------------------


def _hub_response(status: int):
    httpx2 = pytest.importorskip("httpx2")
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


def _hub_errors() -> dict[str, tuple[type[PhicapError], Exception]]:
    from huggingface_hub import errors as hub

    return {
        "no connection": (ModelUnavailable, ConnectionError("[Errno 101] Network is unreachable")),
        "timeout": (ModelUnavailable, TimeoutError("read timed out")),
        "hub unreachable, not cached": (
            ModelUnavailable,
            hub.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub"),
        ),
        "hub 503": (ModelUnavailable, hub.HfHubHTTPError("503 Server Error", response=_hub_response(503))),
        "hub 429": (ModelUnavailable, hub.HfHubHTTPError("429 Too Many Requests", response=_hub_response(429))),
        "disk full": (ModelUnavailable, OSError(28, "No space left on device")),
        "unknown repository": (
            ConfigError,
            hub.RepositoryNotFoundError("404 Repository Not Found", response=_hub_response(404)),
        ),
        "gated": (ConfigError, hub.GatedRepoError("401 gated", response=_hub_response(401))),
        "unknown revision": (ConfigError, hub.RevisionNotFoundError("404 Revision", response=_hub_response(404))),
        "token refused": (ConfigError, hub.HfHubHTTPError("403 Forbidden", response=_hub_response(403))),
        "malformed id": (ConfigError, hub.HFValidationError("Repo id must be in the form 'repo_name'")),
        "cache not writable": (ConfigError, PermissionError(13, "Permission denied", "/var/cache/phicapd")),
    }


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("case", list(_hub_errors()))
def test_a_failed_fetch_is_retryable_only_when_it_may_go_away(case: str, online, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    expected, error = _hub_errors()[case]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    settings = ModelSettings(id="someone/model", revision="main")
    with pytest.raises(PhicapError) as raised:
        download_model(settings, progress=False)
    assert type(raised.value) is expected
    assert "someone/model@main" in str(raised.value) and str(error) in str(raised.value)
    assert raised.value.retryable is (expected is ModelUnavailable)


def test_a_fetch_failing_in_offline_mode_is_a_config_error(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ConfigError, match="offline mode is on"):
        download_model(ModelSettings(id="someone/model"), progress=False)


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/driver/nvidia, /dev and PCI bus (all empty: no GPU) and a CUDA build of torch
    that finds no GPU."""
    from phicapd.model import loading

    root = tmp_path / "machine"
    for name in ("proc", "dev", "pci"):
        (root / name).mkdir(parents=True)
    monkeypatch.setattr(loading, "PROC_NVIDIA", root / "proc" / "nvidia")
    monkeypatch.setattr(loading, "DEV_DIR", root / "dev")
    monkeypatch.setattr(loading, "PCI_DEVICES", root / "pci")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(loading, "_cuda_init_error", lambda: "The NVIDIA driver on your system is too old")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return root


def _driver_loaded(machine: Path) -> None:
    (machine / "proc" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (machine / "proc" / "nvidia" / "version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  Release Build\n"
    )
    (machine / "dev" / "nvidia0").write_text("")


def _pci_gpu(machine: Path, name: str = "0000:01:00.0", klass: str = "0x030200") -> None:
    device = machine / "pci" / name
    device.mkdir()
    (device / "vendor").write_text("0x10de\n")
    (device / "class").write_text(klass + "\n")


def test_auto_on_a_gpu_torch_cannot_use_warns_before_using_the_cpu(machine: Path, caplog):
    _driver_loaded(machine)
    with caplog.at_level(logging.WARNING, logger="phicapd.model.loading"):
        assert resolve_device("auto") == torch.device("cpu")
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "NVIDIA GPU is present" in message and "driver/CUDA mismatch" in message
    assert "driver 535.104.05" in message and "CUDA 12.8" in message
    assert "too old" in message and "CPU" in message


def test_auto_on_a_gpu_whose_driver_is_not_loaded_says_so(machine: Path, caplog):
    _pci_gpu(machine, "0000:00:02.0", "0x030000")
    _pci_gpu(machine, "0000:01:00.1", "0x040300")  # the GPU's HDMI audio function: not the evidence
    with caplog.at_level(logging.WARNING, logger="phicapd.model.loading"):
        assert resolve_device("auto") == torch.device("cpu")
    [record] = caplog.records
    assert "NVIDIA PCI device 0000:00:02.0" in record.getMessage()
    assert "kernel driver is not loaded" in record.getMessage()


def test_auto_without_a_gpu_is_quiet(machine: Path, caplog):
    (machine / "pci" / "0000:00:1f.3").mkdir()  # an Intel device, unreadable files: skipped
    _pci_gpu(machine, "0000:03:00.0", "0x040300")
    with caplog.at_level(logging.DEBUG, logger="phicapd.model.loading"):
        assert resolve_device("auto") == torch.device("cpu")
    assert caplog.records == []


def test_auto_with_gpus_hidden_on_purpose_does_not_warn(machine: Path, caplog, monkeypatch: pytest.MonkeyPatch):
    _driver_loaded(machine)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with caplog.at_level(logging.DEBUG, logger="phicapd.model.loading"):
        assert resolve_device("auto") == torch.device("cpu")
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_auto_with_a_cpu_only_torch_on_a_gpu_machine_warns(machine: Path, caplog, monkeypatch: pytest.MonkeyPatch):
    _driver_loaded(machine)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with caplog.at_level(logging.WARNING, logger="phicapd.model.loading"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "CPU-only build" in caplog.records[0].getMessage()


def test_cuda_that_may_come_up_is_retryable(machine: Path):
    _pci_gpu(machine)  # the driver is not up yet at boot
    with pytest.raises(ModelUnavailable, match="kernel driver is not loaded"):
        resolve_device("cuda")
    _driver_loaded(machine)
    with pytest.raises(ModelUnavailable, match="too old"):
        resolve_device("cuda:0")


def test_cuda_that_can_never_work_is_a_config_error(machine: Path, monkeypatch: pytest.MonkeyPatch):
    _driver_loaded(machine)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='-1' hides every GPU"):
        resolve_device("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ConfigError, match="CPU-only build"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu")


def test_cuda_init_error_never_raises():
    from phicapd.model.loading import _cuda_init_error

    result = _cuda_init_error()
    assert result is None or isinstance(result, str)


# -- another user's daemon loads a checkpoint made by make-test-model ------------------------------

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]

# Imports torch as root, then loads as nobody, with exactly an unprivileged user's file access.
_LOAD_AS_NOBODY = f"""
import os, sys
from pathlib import Path
import torch
from phicapd.model.loading import load_model
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
try:
    load_model(Path(sys.argv[1]), device=torch.device("cpu"), dtype=torch.float32)
except Exception as e:
    print(f"{{type(e).__name__}}: {{e}}")
"""


def test_make_test_model_files_are_as_readable_as_each_other(tiny_checkpoint: Path) -> None:
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tiny_checkpoint.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_an_unreadable_shard_says_permission_denied(tiny_checkpoint: Path) -> None:
    with tempfile.TemporaryDirectory() as top:
        checkpoint = Path(shutil.copytree(tiny_checkpoint, Path(top) / "ckpt"))
        for directory in (Path(top), checkpoint):
            directory.chmod(0o755)
        for path in checkpoint.iterdir():
            path.chmod(0o644)
        shard = checkpoint / "model-00002-of-00002.safetensors"
        shard.chmod(0o600)
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_AS_NOBODY, str(checkpoint)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.stdout == f"CheckpointError: {shard}: permission denied for uid {NOBODY}\n"
