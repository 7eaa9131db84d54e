"""Find a checkpoint (local directory or Hugging Face cache) and load it into the native model.

Microsoft's safetensors are loaded unchanged: the language-model keys already match
``Phi3ForCausalLM``; vision keys get their prefix swapped (phi3v.md §2). The model is built on
the meta device and each tensor is read straight onto the target device in the target dtype,
so a 4B model never exists twice in memory and never gets a random init.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from phicapd.config import ModelSettings
from phicapd.errors import ConfigError, ModelUnavailable, PhicapError
from phicapd.model.configuration import Phi3VConfig, read_config
from phicapd.model.modeling import Phi3VForCausalLM

log = logging.getLogger(__name__)

# What `download-model` fetches: weights, configs, tokenizer. Never code (*.py).
DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "model.safetensors.index.json",
    "*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

VISION_PREFIX = "model.vision_embed_tokens."
CLIP_PREFIX = VISION_PREFIX + "img_processor."
PROJECTOR_KEYS = ("sub_GN", "glb_GN", "img_projection.")


class CheckpointError(PhicapError):
    """The checkpoint on disk does not match the model (missing, unexpected or misshapen keys)."""

    code = "model_checkpoint_invalid"


# -- where the files are ---------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(v.upper() in ("1", "ON", "YES", "TRUE") for v in env)


def download_model(settings: ModelSettings, *, progress: bool = True) -> Path:
    """Fetch ``settings.id`` at ``settings.revision`` into the HF cache (``HF_HOME``); return its dir.

    Only weights, configs and tokenizer files are downloaded; remote code is never fetched.
    A configured local ``path`` is returned as is.
    """
    if settings.path is not None:
        return _check_dir(settings.path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(
            settings.id,
            revision=settings.revision,
            allow_patterns=DOWNLOAD_PATTERNS,
            ignore_patterns=["*.py"],
            local_files_only=_offline(),
        )
    except Exception as e:  # hub errors are many classes; all mean "could not get the model"
        raise _fetch_error(e, settings) from None
    finally:
        if not progress:
            enable_progress_bars()
    return _check_dir(Path(path))


# The first run without the weights: what a new user can do about it, in one line.
_LOCAL_WAYS = (
    "set [model] path to a local checkpoint, or try phicapd out with `phicapd make-test-model DIR` "
    "and [model] path = DIR"
)
WAYS_FORWARD = f"to go on, let phicapd reach huggingface.co to download it, or {_LOCAL_WAYS}"


def _first_line(e: Exception) -> str:
    """The hub's errors run to several lines of advice; the first one says what happened."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _fetch_error(e: Exception, settings: ModelSettings) -> PhicapError:
    """What a failed ``snapshot_download`` means for the daemon: a setting to fix (exit 78), or
    the hub or the network failing now (``ModelUnavailable``, exit 75, restarted by systemd).

    Permanent: offline mode, an unknown or gated repository, an unknown revision, a malformed
    id, another 4xx answer (401/403: a token is needed) and a cache this user may not write.
    Everything else (no connection, a timeout, a 5xx or 429 from the hub, a download cut
    midway, a full disk) may go away by itself.
    """
    from huggingface_hub import errors as hub

    what = f"model {settings.id}@{settings.revision}"
    if _offline():
        return ConfigError(
            f"cannot fetch {what} (offline mode is on: the model must already be in the cache): "
            f"{_first_line(e)}; {WAYS_FORWARD}"
        )
    permanent: tuple[type[BaseException], ...] = (
        hub.RepositoryNotFoundError,  # also GatedRepoError
        hub.RevisionNotFoundError,
        hub.DisabledRepoError,
        hub.OfflineModeIsEnabled,
        ValueError,  # HFValidationError: not a repository id
        PermissionError,
    )
    status = getattr(getattr(e, "response", None), "status_code", None)
    client_error = isinstance(e, hub.HfHubHTTPError) and isinstance(status, int) and 400 <= status < 500
    if isinstance(e, permanent) or (client_error and status not in (408, 429)):
        return ConfigError(f"cannot fetch {what}: {type(e).__name__}: {_first_line(e)}")
    return ModelUnavailable(
        f"cannot fetch {what} now (the hub or the network failed: {_first_line(e)}); {WAYS_FORWARD}"
    )


def local_model_dir(settings: ModelSettings) -> Path | None:
    """``[model] path``, else the cached hub snapshot; None when it is not cached and would be
    downloaded. ``ConfigError`` for a ``path`` that is not a checkpoint directory, or a model
    that is not cached while offline mode is on."""
    if settings.path is not None:
        return _check_dir(settings.path)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            settings.id, revision=settings.revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True
        )
        return _check_dir(Path(path))
    except Exception:
        if _offline():
            raise ConfigError(
                f"model {settings.id}@{settings.revision} is not in the Hugging Face cache and offline "
                f"mode is on; to go on, run `phicapd download-model` where the network is allowed, or {_LOCAL_WAYS}"
            ) from None
    return None


def resolve_model_dir(settings: ModelSettings) -> Path:
    """The local directory to load: ``[model] path``, else the cached (or fetched) hub snapshot."""
    local = local_model_dir(settings)
    if local is not None:
        return local
    log.info("model %s@%s not cached; downloading", settings.id, settings.revision)
    return download_model(settings)


def check_model(settings: ModelSettings) -> str | None:
    """What ``load_from_settings`` refuses before it reads a weight, with the same errors: the
    device, then the checkpoint directory and the shards its index names. ``phicapd
    check-config`` runs it. Returns a note when the model is not cached (``run`` downloads it)."""
    resolve_device(settings.device)
    model_dir = local_model_dir(settings)
    if model_dir is None:
        return (
            f"model {settings.id}@{settings.revision} is not in the Hugging Face cache; "
            "`phicapd run` downloads it first (or run `phicapd download-model` now)"
        )
    checkpoint_files(model_dir)
    return None


def _check_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model path {path} has no config.json")
    return path


# -- device and dtype ------------------------------------------------------------------------


# Where an NVIDIA GPU shows itself (module level so that tests can point them elsewhere).
PROC_NVIDIA = Path("/proc/driver/nvidia")
DEV_DIR = Path("/dev")
PCI_DEVICES = Path("/sys/bus/pci/devices")
_NVIDIA_PCI_VENDOR = "0x10de"
_GPU_PCI_CLASSES = ("0x0300", "0x0302")  # VGA-compatible controller, 3D controller


def nvidia_gpu_evidence() -> str | None:
    """What shows that an NVIDIA GPU is installed, or None: the driver's ``/proc`` entries, a
    ``/dev/nvidiaN`` node, or an NVIDIA display controller on the PCI bus (there before the
    driver is loaded)."""
    with contextlib.suppress(OSError):
        if any((PROC_NVIDIA / "gpus").iterdir()):
            return str(PROC_NVIDIA / "gpus")
    nodes = sorted(DEV_DIR.glob("nvidia[0-9]*"))
    if nodes:
        return str(nodes[0])
    try:
        devices = sorted(PCI_DEVICES.iterdir())
    except OSError:
        return None
    for device in devices:
        try:
            vendor = (device / "vendor").read_text().strip()
            klass = (device / "class").read_text().strip()
        except OSError:
            continue
        if vendor == _NVIDIA_PCI_VENDOR and klass.startswith(_GPU_PCI_CLASSES):
            return f"NVIDIA PCI device {device.name}"
    return None


def _cuda_hidden() -> bool:
    """``CUDA_VISIBLE_DEVICES`` deliberately hides every GPU ("" or "-1")."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and (not value.strip() or value.strip().startswith("-"))


def _driver_version() -> str | None:
    try:
        text = (PROC_NVIDIA / "version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\w.]*)", text)
    return match.group(1) if match else None


def _cuda_init_error() -> str | None:
    """torch's own reason for not using CUDA ("The NVIDIA driver on your system is too old")."""
    try:
        torch.cuda.init()
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def cuda_diagnosis() -> str:
    """The likely reason ``torch.cuda.is_available()`` is False, for a message."""
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build that matches the driver"
    if _cuda_hidden():
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    if not PROC_NVIDIA.exists():
        cause = "the NVIDIA kernel driver is not loaded (no /proc/driver/nvidia)"
    else:
        built = torch.version.cuda or torch.version.hip or "unknown"
        cause = (
            f"likely a driver/CUDA mismatch (driver {_driver_version() or 'unknown'}, this torch needs one that "
            f"supports CUDA {built}) or GPU device nodes this user cannot open"
        )
    reason = _cuda_init_error()
    return f"{cause}; torch says: {reason}" if reason else cause


def resolve_device(name: str) -> torch.device:
    """ "auto" is the first CUDA GPU when there is one, else the CPU.

    ``"cuda"`` without a usable GPU is ``ModelUnavailable`` (the driver may come up: systemd
    retries) unless it never can be here: a CPU-only torch, or ``CUDA_VISIBLE_DEVICES`` hiding
    every GPU (``ConfigError``).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _warn_if_gpu_unused()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"model.device {name!r} is not a valid torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = cuda_diagnosis()
        if not torch.backends.cuda.is_built() or _cuda_hidden():
            raise ConfigError(f"model.device is {name!r} but CUDA is not available: {reason}")
        # torch counts the GPUs once per process: only a new process sees a driver that came up
        # later, so this one is not retried in-process (code gpu_unavailable).
        raise ModelUnavailable(
            f"model.device is {name!r} but CUDA is not available (yet?): {reason}", code="gpu_unavailable"
        )
    return device


def _warn_if_gpu_unused() -> None:
    """device = "auto" found no usable GPU: say so loudly if there is one that should have been."""
    evidence = nvidia_gpu_evidence()
    if evidence is None:
        return
    if _cuda_hidden():
        log.info("CUDA_VISIBLE_DEVICES hides the GPUs (%s); running on the CPU", evidence)
        return
    log.warning(
        "an NVIDIA GPU is present (%s) but torch cannot use CUDA: %s. Falling back to the CPU, "
        'which is far slower; set model.device = "cuda" to wait for the GPU instead',
        evidence,
        cuda_diagnosis(),
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" is bf16 on a GPU (fp16 where bf16 is unsupported) and fp32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    if name != "flash_attention_2":
        return name
    from transformers.utils import is_flash_attn_2_available

    if device.type == "cuda" and is_flash_attn_2_available():
        return name
    log.warning("flash_attention_2 requested but flash-attn is not usable here; using sdpa")
    return "sdpa"


# -- checkpoint keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """How checkpoint keys become model keys for one model instance."""

    clip_prefix: str  # the tower's own prefix for CLIP keys ("vision_model." or "")
    clip_layers: int  # encoder layers the tower keeps (layers after the feature layer are skipped)

    def target(self, key: str) -> str | None:
        """The model key for a checkpoint key; None when the key is deliberately not loaded."""
        if key.startswith(CLIP_PREFIX):
            rest = key[len(CLIP_PREFIX) :].removeprefix("vision_model.")
            if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= self.clip_layers:
                return None  # computed and discarded by the reference
            return f"vision_tower.{self.clip_prefix}{rest}"
        if key.startswith(VISION_PREFIX):
            rest = key[len(VISION_PREFIX) :]
            return rest if rest.startswith(PROJECTOR_KEYS) else f"unexpected:{key}"
        if key.startswith(("model.", "lm_head.")):
            return f"language_model.{key}"
        return f"unexpected:{key}"


def key_map_for(model: Phi3VForCausalLM) -> KeyMap:
    keys = model.vision_tower.state_dict().keys()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    return KeyMap(clip_prefix=prefix, clip_layers=model.vision_tower.config.num_hidden_layers)


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> shard path, from the safetensors index (or the single-file checkpoint)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from None
        files = {key: model_dir / shard for key, shard in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {key: single for key in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    raise CheckpointError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def _shape_listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_load(model: Phi3VForCausalLM, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> model key for every tensor to load; raise listing every mismatch."""
    mapping = key_map_for(model)
    plan: dict[str, str] = {}
    for key in checkpoint_keys:
        target = mapping.target(key)
        if target is None:
            continue
        plan[key] = target
    expected = set(model.state_dict().keys())
    unexpected = [k for k, t in plan.items() if t not in expected]
    missing = expected - set(plan.values())
    if missing or unexpected:
        lines = ["checkpoint does not match Phi-3.5-vision:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_shape_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_shape_listing(unexpected)}")
        raise CheckpointError("\n".join(lines))
    return plan


# -- building and loading --------------------------------------------------------------------


def build_model(config: Phi3VConfig, attn_implementation: str) -> Phi3VForCausalLM:
    """The model on the meta device: shapes only, no memory, no init."""
    config.text._attn_implementation = attn_implementation
    config.vision._attn_implementation = attn_implementation
    with torch.device("meta"):
        return Phi3VForCausalLM(config)


def _restore_buffers(model: Phi3VForCausalLM, device: torch.device) -> None:
    """Recreate the non-persistent buffers (not in any checkpoint) on the real device."""
    lm = model.language_model.model
    lm.rotary_emb = type(lm.rotary_emb)(config=model.language_model.config).to(device)
    for module in model.vision_tower.modules():
        if hasattr(module, "position_ids") and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.num_positions, device=device).expand(1, -1)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise PhicapError(f"internal: buffers not initialised after loading: {', '.join(leftover)}")
    model.use_rowwise_rope()


def _open_shard(path: Path, device: torch.device) -> Any:
    """``safe_open``, with a refused read said as such (safetensors says "No such file")."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except OSError as e:
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"{path}: permission denied for uid {os.geteuid()}") from None
        raise CheckpointError(f"{path}: {e.strerror or e}") from None


def load_model(
    model_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
) -> Phi3VForCausalLM:
    """Load a checkpoint directory in Microsoft's layout; every weight lands on ``device`` as ``dtype``."""
    config = read_config(model_dir)
    model = build_model(config, attn_implementation)
    files = checkpoint_files(model_dir)
    plan = plan_load(model, files)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    by_file: dict[Path, list[str]] = {}
    for key in plan:
        by_file.setdefault(files[key], []).append(key)
    state: dict[str, torch.Tensor] = {}
    bad_shapes: list[str] = []
    for path, keys in by_file.items():
        with _open_shard(path, device) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                target = plan[key]
                if tensor.shape != expected[target]:
                    bad_shapes.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[target])}")
                    continue
                state[target] = tensor.to(dtype)
    if bad_shapes:
        raise CheckpointError("checkpoint tensors have the wrong shape: " + "; ".join(bad_shapes))
    model.load_state_dict(state, strict=True, assign=True)
    _restore_buffers(model, device)
    model.requires_grad_(False)
    if device.type == "cpu":
        model.use_fused_cpu_vision()
    return model.eval()


def load_from_settings(settings: ModelSettings) -> tuple[Phi3VForCausalLM, Path]:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = resolve_attn_implementation(settings.attn_implementation, device)
    model_dir = resolve_model_dir(settings)
    return load_model(model_dir, device=device, dtype=dtype, attn_implementation=attn), model_dir
