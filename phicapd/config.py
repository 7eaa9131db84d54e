"""Configuration: a TOML file plus ``PHICAPD_SECTION__KEY`` environment overrides.

``load_settings`` is the only entry point. Every problem (a missing explicit file, a TOML
syntax error, an unknown key, a wrong type, a ``PHICAPD_*`` environment variable that names no
setting) becomes one ``ConfigError`` whose message names the file and the key, and the daemon
turns it into exit code 78 (EX_CONFIG), which systemd's ``RestartPreventExitStatus=78`` refuses
to restart.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from phicapd import image_types
from phicapd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/phicapd/phicapd.toml")
#: Names the configuration file when ``--config`` does not, for phicapd and phicapctl alike.
CONFIG_ENV = "PHICAPD_CONFIG"
SYSTEM_SOCKET_PATH = Path("/run/phicapd/phicapd.sock")
DEFAULT_PROMPT = "Describe this image in detail, including the main subject, actions, and setting."
# What every install decodes; a root's default ``include`` adds HEIC/HEIF/AVIF where a decoder
# for them is installed (``image_types.default_extensions``).
DEFAULT_IMAGE_EXTENSIONS = image_types.BASE_EXTENSIONS

# What becomes of a sidecar that already exists ([sidecar] existing, [[watch]] existing):
#   skip          keep it while it is at least as new as its image (an image saved after its
#                 sidecar is captioned again);
#   overwrite     replace any sidecar this daemon did not write for the image's current bytes;
#   only-missing  never replace it, whatever its age: only images without one are captioned.
# phicapctl --force and forced retries caption and replace under every policy.
ExistingPolicy = Literal["skip", "overwrite", "only-missing"]

# What the daemon writes for each caption ([sidecar] formats, [[watch]] formats); the names are
# public API. ``txt``: ``photo.txt``; ``json``: ``photo.json``, the caption with its provenance;
# ``jsonl``: the directory's ``metadata.jsonl`` (Hugging Face imagefolder); ``xmp``: an XMP
# sidecar's dc:description, merged into an existing one; ``embed``: the image's own XMP, EXIF and
# IPTC (opt-in: it rewrites the image file, pixels untouched). xmp and embed need pyexiv2.
OutputFormat = Literal["txt", "xmp", "embed", "json", "jsonl"]
#: The formats this build writes.
AVAILABLE_FORMATS = ("txt", "xmp", "embed", "json", "jsonl")
#: Formats written through pyexiv2 (``outputs.metadata``).
METADATA_FORMATS = ("xmp", "embed")
# The XMP sidecar's name: "stem" (photo.xmp, as Lightroom and Camera Raw read for raw files;
# same-stem images get photo.png.xmp by the .txt naming rule) or "full" (photo.NEF.xmp, as
# digiKam and darktable write by default).
XmpNaming = Literal["stem", "full"]
#: What becomes of an image's outputs when the image is deleted (or moved out of every root):
#: "keep" them, or "remove" those that still hold phicapd's own unedited caption.
OnDelete = Literal["keep", "remove"]
JSON_EXTENSION = ".json"
MANIFEST_NAME = "metadata.jsonl"
# What happens to captions made with other settings than the root's current ones: "manual"
# (listed by `phicapctl stale`, redone by `phicapctl recaption --stale`) or "auto" (redone at
# start and after a reload, as if `recaption --stale` had been run). Hand-edited captions are
# never redone by either.
RestalePolicy = Literal["manual", "auto"]


def _check_formats(value: list[OutputFormat] | None) -> list[OutputFormat] | None:
    if value is None:
        return None
    if not value:
        raise ValueError('formats must name at least one format, e.g. ["txt"]')
    seen: set[str] = set()
    for name in value:
        if name in seen:
            raise ValueError(f"format {name!r} is listed twice")
        seen.add(name)
        if name not in AVAILABLE_FORMATS:
            available = ", ".join(AVAILABLE_FORMATS)
            raise ValueError(f"format {name!r} is not available in this phicapd yet (it writes: {available})")
    return value


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``, else /var/lib/phicapd for root, else the XDG state dir."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if _is_root():
        return Path("/var/lib/phicapd")
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg) / "phicapd"
    try:
        home = Path.home()
    except RuntimeError:  # no $HOME and no passwd entry (a bare uid in a container)
        raise ConfigError("[state] dir: this user has no home directory for the default; set it") from None
    return home / ".local" / "state" / "phicapd"


def user_socket_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "phicapd.sock"
    return Path(f"/tmp/phicapd-{os.getuid()}") / "phicapd.sock"


def default_socket_path() -> Path:
    """The system socket for root or a systemd service (``$INVOCATION_ID``); a per-user socket otherwise."""
    if _is_root() or os.environ.get("INVOCATION_ID"):
        return SYSTEM_SOCKET_PATH
    return user_socket_path()


def sidecar_ignore_pattern(extension: str) -> str:
    """A glob for every name ending in ``extension``, in any letter case.

    Ignore patterns match case-sensitively; include patterns do not, so ``include = ["*"]``
    takes ``notes.TXT`` too, and a case-insensitive filesystem may list a sidecar in another
    case than we wrote it. ``.txt`` -> ``*.[tT][xX][tT]``.
    """
    out = "*"
    for char in extension:
        if char.lower() != char.upper():
            out += f"[{char.lower()}{char.upper()}]"
        elif char in "*?[":
            out += f"[{char}]"
        else:
            out += char
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    # "native": the model in this process (phicapd.model); "openai": a fleet of OpenAI-compatible
    # servers such as vLLM, configured in [remote] (phicapd.remote). The names are public API.
    backend: Literal["native", "openai"] = "native"
    id: str = "microsoft/Phi-3.5-vision-instruct"
    path: Path | None = None
    revision: str = "main"
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    num_crops: int = Field(16, ge=1, le=64)
    max_new_tokens: int = Field(512, ge=1, le=4096)
    prompt: str = Field(DEFAULT_PROMPT, min_length=1)
    # Rows decoded at once. None: 32 on a GPU (a decode step there is bound by reading the
    # weights and KV cache, so more rows share the weights; fewer if free memory says so), 16 on
    # the CPU (compute-bound; two to eight cores saturate around 16).
    max_batch: int | None = Field(None, ge=1, le=512)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    strip_openers: list[str] = ["The image features"]
    compile: bool = True

    @property
    def source(self) -> str:
        """What to load: the local directory if one is set, else the hub id."""
        return str(self.path) if self.path else self.id


class RemoteSettings(_Section):
    """``[remote]``: the OpenAI-compatible servers of ``[model] backend = "openai"``.

    The prompt, ``max_new_tokens``, ``num_crops`` and sampling come from ``[model]`` as for the
    native model, so switching backends keeps the captions' settings.
    """

    endpoints: list[str] = []  # base URLs ending in /v1, e.g. "http://gpu1:8000/v1"
    model: str = "microsoft/Phi-3.5-vision-instruct"  # the served model name (vllm --served-model-name)
    # A file holding the API key (systemd's LoadCredential=); never the key itself, never logged.
    api_key_file: Path | None = None
    tls_verify: bool = True
    ca_file: Path | None = None  # a private CA bundle for https:// endpoints
    # One request's deadline, connect to last byte (phicapd.remote.chat_api); the connect alone gets
    # at most connect_timeout_seconds of it.
    timeout_seconds: float = Field(120.0, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    # Adaptive in-flight limit per endpoint: starts at initial, grows while latency holds, halves
    # on 429/503, never above max.
    initial_in_flight: int = Field(4, ge=1, le=1024)
    max_in_flight: int = Field(32, ge=1, le=1024)
    probe_interval_seconds: float = Field(5.0, gt=0)  # how often a down endpoint is tried again
    failures_to_trip: int = Field(3, ge=1)  # server errors, drops or timeouts in a row that take an endpoint out
    # Pass [model] num_crops as vLLM's mm_processor_kwargs (a server that refuses them: false).
    send_num_crops: bool = True
    # Images are sent resized as the model's HD transform resizes them for num_crops, and
    # lossless by default: the server sees the pixels the native engine sees, so the captions
    # agree (``remote.encode``). JPEG: about a tenth of the bytes, slightly other pixels.
    image_format: Literal["jpeg", "png"] = "png"
    jpeg_quality: int = Field(95, ge=50, le=100)
    # A last cap on the pixels sent, for a server's request limits (16 crops: 1344 x 1344 at most).
    max_pixels: int = Field(1344 * 1344, ge=64 * 64)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        out: list[str] = []
        for raw in value:
            url = raw.strip().rstrip("/")
            shown = redact_userinfo(url)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{shown!r} is not an http:// or https:// URL such as 'http://gpu1:8000/v1'")
            if parts.username or parts.password:
                raise ValueError(f"{shown!r}: put the API key in api_key_file, not in the URL")
            if not parts.path.endswith("/v1") or parts.query or parts.fragment:
                raise ValueError(f"{shown!r} must end in /v1 (the OpenAI API's base URL, e.g. 'http://gpu1:8000/v1')")
            if url in out:
                raise ValueError(f"{shown!r} is listed twice")
            out.append(url)
        return out

    @model_validator(mode="after")
    def _limits(self) -> RemoteSettings:
        if self.initial_in_flight > self.max_in_flight:
            raise ValueError(
                f"initial_in_flight ({self.initial_in_flight}) is above max_in_flight ({self.max_in_flight})"
            )
        return self


class WatchRoot(_Section):
    path: Path
    recursive: bool = True
    prompt: str | None = None
    prefix: str = ""
    suffix: str = ""
    existing: ExistingPolicy | None = None
    include: list[str] = Field(default_factory=lambda: [f"*{e}" for e in image_types.default_extensions()])
    ignore: list[str] = []
    poll: bool | None = None
    formats: list[OutputFormat] | None = None  # None: [sidecar] formats
    restale: RestalePolicy | None = None  # None: [sidecar] restale
    xmp_naming: XmpNaming | None = None  # None: [sidecar] xmp_naming
    single_line: bool = False  # every output of this root holds its caption as one line
    on_delete: OnDelete = "keep"

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[OutputFormat] | None) -> list[OutputFormat] | None:
        return _check_formats(value)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError(f"watch path must be absolute, got {str(value)!r}")
        return value


class WatcherSettings(_Section):
    settle_seconds: float = Field(2.0, ge=0)
    rescan_interval_seconds: float = Field(3600.0, ge=0)
    poll_interval_seconds: float = Field(10.0, gt=0)


class SidecarSettings(_Section):
    extension: str = ".txt"
    existing: ExistingPolicy = "skip"
    formats: list[OutputFormat] = ["txt"]
    restale: RestalePolicy = "manual"
    xmp_naming: XmpNaming = "stem"

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[OutputFormat]) -> list[OutputFormat]:
        checked = _check_formats(value)
        assert checked is not None
        return checked

    @field_validator("extension")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not value.startswith(".") or "/" in value or len(value) < 2:
            raise ValueError(f"extension must look like '.txt', got {value!r}")
        return value


def default_decode_workers() -> int:
    """Half the CPUs this process may use, 2 to 8: decoding and HD crops cost 50-150 ms of one
    core per photo, so a GPU captioning 10+ images/s needs several; the rest is left to the
    socket, the writer and the GPU worker's own launches."""
    return min(8, max(2, len(os.sched_getaffinity(0)) // 2))


class SchedulerSettings(_Section):
    batch_window_ms: float = Field(20.0, ge=0)
    interactive_slots: int = Field(1, ge=0)
    decode_workers: int = Field(default_factory=default_decode_workers, ge=1, le=64)
    prefetch: int = Field(64, ge=1)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(30.0, ge=0)


class ImagingSettings(_Section):
    max_file_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_pixels: int = Field(64_000_000, gt=0)


class FetchSettings(_Section):
    max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    read_timeout_seconds: float = Field(10.0, gt=0)
    total_timeout_seconds: float = Field(30.0, gt=0)
    max_redirects: int = Field(5, ge=0, le=20)
    allow_networks: list[str] = []
    proxy: str | None = None
    user_agent: str = "phicapd"

    # phicapd/fetch.py parses both on every request; checking them here makes a typo fail
    # `phicapd check-config` and the start instead of every caption-url.

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)  # as fetch.AddressPolicy parses it
            except ValueError as e:
                raise ValueError(f"{entry!r} is not an IP network such as '10.0.0.0/8' or 'fd00::/8' ({e})") from None
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # `proxy = ""` (or an empty PHICAPD_FETCH__PROXY) means no proxy
        from urllib3.exceptions import LocationParseError
        from urllib3.util import parse_url

        shown = redact_userinfo(value)
        try:
            url = parse_url(value)  # what urllib3.ProxyManager parses it with
        except LocationParseError:
            raise ValueError(f"{shown!r} is not a URL such as 'http://proxy.internal:3128'") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"{shown!r} is not an http:// or https:// URL with a host, such as 'http://proxy.internal:3128'"
            )
        return value


def redact_userinfo(url: str) -> str:
    """``url`` with a ``user:password@`` part replaced, for error messages."""
    return re.sub(r"(?<=//)[^/@]*@", "***@", url)


class ControlSettings(_Section):
    socket: Path = Field(default_factory=default_socket_path)
    socket_group: str | None = None
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(16 * 1024, gt=0)
    request_timeout_seconds: float = Field(30.0, gt=0)
    # A request's head (and so a client that sends nothing, or an idle keep-alive connection)
    # gets at most this long, within ``request_timeout_seconds``.
    head_timeout_seconds: float = Field(10.0, gt=0)
    caption_timeout_seconds: float = Field(600.0, gt=0)
    max_connections: int = Field(128, ge=1)


class StateSettings(_Section):
    dir: Path = Field(default_factory=default_state_dir)


class LogSettings(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHICAPD_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    model: ModelSettings = ModelSettings()
    remote: RemoteSettings = RemoteSettings()
    watch: list[WatchRoot] = []
    watcher: WatcherSettings = WatcherSettings()
    sidecar: SidecarSettings = SidecarSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    imaging: ImagingSettings = ImagingSettings()
    fetch: FetchSettings = FetchSettings()
    # Made per load, not at import: their defaults depend on the user and the environment.
    control: ControlSettings = Field(default_factory=ControlSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _remote_complete(self) -> Settings:
        if self.model.backend == "openai" and not self.remote.endpoints:
            raise ValueError('[model] backend = "openai" needs [remote] endpoints, e.g. ["http://gpu1:8000/v1"]')
        return self

    @model_validator(mode="after")
    def _distinct_roots(self) -> Settings:
        seen: set[Path] = set()
        for root in self.watch:
            if root.path in seen:
                raise ValueError(f"watch path {str(root.path)!r} is listed twice")
            seen.add(root.path)
        return self

    @model_validator(mode="after")
    def _roots_ignore_sidecars(self) -> Settings:
        # Our own sidecars must never trigger work, whatever a root includes (`include = ["*"]`).
        # Appended to the root's own patterns so that everything that applies them (the watcher,
        # the scans, list_images behind the naming rule, phicapctl through /v1/sidecar) agrees.
        pattern = sidecar_ignore_pattern(self.sidecar.extension)
        for root in self.watch:
            formats = self.formats_for(root)
            patterns = [pattern]
            if "json" in formats:
                patterns.append(sidecar_ignore_pattern(JSON_EXTENSION))
            if "jsonl" in formats:
                patterns.append(MANIFEST_NAME)
            if "xmp" in formats:
                patterns.append(sidecar_ignore_pattern(".xmp"))
            missing = [p for p in patterns if p not in root.ignore]
            if missing:
                root.ignore = [*root.ignore, *missing]
        return self

    @model_validator(mode="after")
    def _no_embedding_into_raws(self) -> Settings:
        from phicapd.raw_roots import check_embedding_roots

        check_embedding_roots(self)
        return self

    @model_validator(mode="after")
    def _metadata_library(self) -> Settings:
        # Only roots that ask for xmp/embed need pyexiv2; without it they fail the start, once.
        wanting = [
            f"watch[{i}].formats"
            for i, root in enumerate(self.watch)
            if set(self.formats_for(root)).intersection(METADATA_FORMATS)
        ]
        if wanting:
            from phicapd.outputs.metadata import MetadataUnavailable, require

            try:
                require()
            except MetadataUnavailable as e:
                raise ValueError(f"{', '.join(wanting)}: xmp and embed {e}") from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment wins over it.
        return (env_settings, init_settings)

    def existing_policy(self, root: WatchRoot) -> ExistingPolicy:
        """What happens to an image's existing sidecar under ``root``: its own setting, else the global one."""
        return root.existing or self.sidecar.existing

    def prompt_for(self, root: WatchRoot) -> str:
        return root.prompt or self.model.prompt

    def formats_for(self, root: WatchRoot | None) -> list[OutputFormat]:
        """What is written for each caption under ``root``: its own ``formats``, else ``[sidecar]``'s."""
        return (root.formats if root is not None else None) or self.sidecar.formats

    def xmp_naming_for(self, root: WatchRoot) -> XmpNaming:
        return root.xmp_naming or self.sidecar.xmp_naming

    def restale_for(self, root: WatchRoot) -> RestalePolicy:
        return root.restale or self.sidecar.restale


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


# Keys whose value may hold a password: an error message never repeats what was given.
_SECRET_KEYS = {"fetch.proxy"}


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = _format_location(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif where in _SECRET_KEYS:
            pass
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8: {e}") from None


ENV_PREFIX = "PHICAPD_"
TEST_ENV_PREFIX = "PHICAPD_TEST_"
#: ``PHICAPD_*`` variables that are not settings, so not typos: phicapctl's socket and config
#: (``phicapd.cli.ctl``), and what the benches and CI read; they run daemons with these set.
#: ``PHICAPD_TEST_*`` is the test suite's own namespace (``TEST_ENV_PREFIX``).
OTHER_ENV_VARIABLES = frozenset(
    {
        "PHICAPD_SOCKET",
        CONFIG_ENV,
        "PHICAPD_OUTAGE_SECONDS",
        "PHICAPD_CI_VENV",
        "PHICAPD_MAX_EXPOSURE",
    }
)


def setting_env_names() -> list[str]:
    """Every environment variable that sets something: a whole section (``PHICAPD_WATCH``, as
    JSON) or one key of it (``PHICAPD_MODEL__DEVICE``)."""
    names: list[str] = []
    for section, field in Settings.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in field.annotation.model_fields]
    return names


def check_environment(environ: Mapping[str, str]) -> None:
    """``ConfigError`` naming each ``PHICAPD_*`` variable that is neither a setting nor one of
    ``OTHER_ENV_VARIABLES``, with the nearest valid name: pydantic-settings would ignore it, and
    a misspelt override must not pass silently any more than a misspelt key in the file."""
    valid = {*setting_env_names(), *OTHER_ENV_VARIABLES}
    # Matched without regard to case, as pydantic-settings reads them (case_sensitive=False).
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and not name.upper().startswith(TEST_ENV_PREFIX)
        and name.upper() not in valid
    )
    if not unknown:
        return
    lines = ["invalid configuration in the environment:"]
    for name in unknown:
        nearest = difflib.get_close_matches(name.upper(), sorted(valid), n=1)
        hint = f" (did you mean {nearest[0]}?)" if nearest else ""
        lines.append(f"  {name}: not a phicapd setting{hint}")
    raise ConfigError("\n".join(lines))


def socket_from_config(path: Path) -> Path | None:
    """The ``[control] socket`` a configuration file sets, or None when it sets none (then the
    daemon's default applies). Only ``[control]`` is validated, as the daemon does: phicapctl
    reads the daemon's file to find it, and the rest (watch roots, the model) is not its business.
    ``ConfigError`` names the file."""
    control = read_toml(path).get("control", {})
    if not isinstance(control, dict) or "socket" not in control:
        return None
    try:
        return ControlSettings.model_validate(control).socket
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path)).replace("\n  ", "\n  control.")) from None


def load_settings(path: Path | None = None) -> Settings:
    """Load the TOML file at ``path`` (or the default if it exists) and apply the environment.

    An explicit ``path`` must exist; the default path is optional so that a bare ``phicapd run``
    works with built-in defaults and environment variables alone. A ``PHICAPD_*`` variable that
    names no setting is an error (``check_environment``).
    """
    check_environment(os.environ)
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if explicit or path.exists():
        data = read_toml(path)
        source = str(path)
    else:
        source = "defaults and environment"
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
