"""Server configuration: one frozen Settings object read once at start-up.

Sources, highest priority first: command-line flags, environment variables (prefix ``LLAMASPLIT_``), the
config file (TOML or YAML, ``--config`` / ``LLAMASPLIT_CONFIG``), then the defaults below. Top-level model
options (ctx, parallel, n_gpu_layers, ...) apply to every model; a ``[[models]]`` entry overrides them for its
model. ``None`` means "the tuner chooses".
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from server.errors import ConfigError
from tuner import CACHE_TYPES, FlashAttn, SplitMode

ENV_PREFIX = "LLAMASPLIT_"
MiB = 1024 * 1024

# The config file's contents for the Settings being built; a context variable keeps load_settings re-entrant.
_file_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "llamasplit_config_file", default=None
)


class SamplingDefaults(BaseModel):
    """Sampling values used when a request leaves them out (llama-server's defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)


class ModelOptions(BaseModel):
    """Load options of a model; the same keys exist at the top level as defaults for every model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ctx: int | None = Field(default=None, ge=1, description="context size in tokens, shared by the slots")
    parallel: int | None = Field(default=None, ge=1, le=256, description="parallel sequences (default 4)")
    kv_unified: bool | None = Field(
        default=None, description="one KV cache shared by all sequences (default: one per sequence)"
    )
    step_tokens: int | None = Field(
        default=None, ge=1, description="tokens per batching step (default: the physical batch, --ubatch-size)"
    )
    keep_alive_s: float | None = Field(
        default=None, ge=0, description="unload after this many idle seconds (default: stay loaded)"
    )
    n_gpu_layers: int | None = Field(default=None, ge=0)
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int | None = Field(default=None, ge=0)
    split_mode: SplitMode | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    flash_attn: FlashAttn | None = None
    batch_size: int | None = Field(default=None, ge=1)
    ubatch_size: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    threads_batch: int | None = Field(default=None, ge=1)

    @field_validator("cache_type_k", "cache_type_v")
    @classmethod
    def _known_cache_type(cls, value: str | None) -> str | None:
        if value is not None and value not in CACHE_TYPES:
            raise ValueError(f"{value!r} is not a KV cache type; use one of {', '.join(CACHE_TYPES)}")
        return value

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _split_from_text(cls, value: Any) -> Any:
        # llama-server writes "3,1"; environment variables and flags arrive as text.
        if isinstance(value, str):
            try:
                return tuple(float(part) for part in value.replace("/", ",").split(",") if part.strip())
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a list of numbers such as 3,1") from exc
        return value

    @field_validator("tensor_split")
    @classmethod
    def _split_not_negative(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or any(v < 0 for v in value) or sum(value) <= 0):
            raise ValueError(f"{list(value)} must be non-negative numbers with a positive sum, e.g. 3,1")
        return value


class ModelSettings(ModelOptions):
    """One served model: a GGUF path (the first file of a split model), its alias and its overrides."""

    path: Path
    alias: str | None = Field(default=None, min_length=1, max_length=256)
    chat_template: str | None = Field(
        default=None, description="a Jinja chat template, inline or a path to a file; None = the GGUF's own"
    )
    sampling: SamplingDefaults | None = None


class Settings(ModelOptions, BaseSettings):
    """Everything the server reads at start-up; frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_nested_delimiter="__", validate_default=True
    )

    config: Path | None = Field(default=None, description="TOML or YAML config file")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    insecure: bool = Field(default=False, description="allow a non-loopback bind without an API key")
    models_dir: Path = Path("models")
    models: tuple[ModelSettings, ...] = ()
    sampling: SamplingDefaults = SamplingDefaults()
    max_queue: int = Field(default=32, ge=0, description="requests waiting per model before 429")
    queue_full_status: int = Field(default=429, description="429 or 503 when a model's queue is full")
    retry_after_s: int = Field(default=1, ge=0)
    max_body_bytes: int = Field(default=8 * MiB, ge=1024)
    reserve_mib: int | None = Field(default=None, ge=0, description="VRAM kept free per GPU (tuner default)")
    device_limit: Annotated[dict[int, int], NoDecode] = Field(
        default_factory=dict, description="bytes a device may give the models, e.g. 0=20GiB,1=12GiB"
    )
    host_limit: int | None = Field(default=None, ge=0, description="host RAM the models may use (default: available)")
    preload: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="models loaded at start-up (default: the only model; several load on demand)"
    )
    preload_all: bool = Field(default=False, description="load every model at start-up")
    pin: Annotated[tuple[str, ...], NoDecode] = Field(default=(), description="models never evicted nor expired")
    load_timeout_s: float = Field(default=600.0, gt=0, description="how long a request waits for its model to load")
    rpc: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="llama.cpp RPC servers (host:port) whose devices come first, as llama-server --rpc"
    )
    rpc_optional: bool = Field(
        default=False, description="start without an RPC server that does not answer (default: refuse to start)"
    )
    repack: bool = Field(default=True, description="repack CPU weights for AMX/AVX (llama-server --no-repack)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("queue_full_status")
    @classmethod
    def _queue_status(cls, value: int) -> int:
        if value not in (429, 503):
            raise ValueError("must be 429 (Too Many Requests) or 503 (Service Unavailable)")
        return value

    @field_validator("preload", "pin", mode="before")
    @classmethod
    def _names_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("host_limit", mode="before")
    @classmethod
    def _host_limit_from_text(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            from tuner import parse_size

            return parse_size(value.strip())
        return value

    @field_validator("device_limit", mode="before")
    @classmethod
    def _limits_from_text(cls, value: Any) -> Any:
        # llama-server's --fit-target style: "0=20GiB,1=12GiB" (sizes as tune-split --gpus accepts them).
        if isinstance(value, str):
            from tuner import parse_size

            limits: dict[int, int] = {}
            for part in (p.strip() for p in value.split(",") if p.strip()):
                index, sep, size = part.partition("=")
                if not sep or not index.strip().isdigit():
                    raise ValueError(f"{part!r} is not DEVICE=SIZE (e.g. 0=20GiB)")
                limits[int(index)] = parse_size(size.strip())
            return limits
        return value

    @field_validator("rpc", mode="before")
    @classmethod
    def _rpc_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("rpc")
    @classmethod
    def _rpc_host_port(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for endpoint in value:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value):
            secret = key.get_secret_value()
            if not secret.strip() or secret != secret.strip():
                raise ValueError(f"API key #{i + 1} is empty or has surrounding spaces")
        return value

    @model_validator(mode="after")
    def _non_loopback_needs_key(self) -> Settings:
        if not is_loopback(self.host) and not self.api_keys and not self.insecure:
            raise ValueError(
                f"host {self.host!r} is not a loopback address, so anyone on the network could use the server; "
                "set an API key (--api-key, --api-key-file or LLAMASPLIT_API_KEYS) or pass --insecure"
            )
        names = {m.alias or m.path.name for m in self.models}
        for setting, given in (("preload", self.preload), ("pin", self.pin)):
            unknown = [n for n in given if self.models and n not in names]
            if unknown:
                raise ValueError(f"{setting} names {', '.join(unknown)}, which no configured model is called")
        aliases = [m.alias or m.path.name for m in self.models]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ValueError(f"several models are named {', '.join(dupes)}; give each a distinct alias")
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
        file_source = InitSettingsSource(settings_cls, init_kwargs=_file_data.get() or {})
        return init_settings, env_settings, file_source

    def model_options(self, model: ModelSettings) -> ModelOptions:
        """The options of ``model`` with the top-level values filling what it leaves unset."""
        merged = {
            name: getattr(model, name) if getattr(model, name) is not None else getattr(self, name)
            for name in ModelOptions.model_fields
        }
        return ModelOptions(**merged)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) config file into a dict; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
    suffix = path.suffix.lower()
    tomllib = _toml_module(path) if suffix == ".toml" else None
    try:
        if tomllib is not None:
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml (it ends in {suffix!r})")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, not a {type(data).__name__}")
    if "config" in data:
        raise ConfigError(f"config file {path} sets 'config'; a config file cannot name another one")
    base = path.parent
    for entry in data.get("models") or []:
        # Relative model paths are relative to the config file, not to the working directory.
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not Path(entry["path"]).is_absolute():
            entry["path"] = str(base / entry["path"])
    return data


def _toml_module(path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # the same parser, for Python 3.10
    except ImportError as exc:
        raise ConfigError(
            f"reading {path} needs Python 3.11 or `pip install tomli`; or write the config as YAML"
        ) from exc
    return tomli


def load_settings(cli: dict[str, Any] | None = None) -> Settings:
    """Build the Settings from flags (``cli``, unset values omitted), the environment and the config file.

    Every validation error becomes one ConfigError naming the key and the bad value (never an API key).
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    config_path = cli.get("config") or os.environ.get(f"{ENV_PREFIX}CONFIG")
    file_data = read_config_file(Path(config_path)) if config_path else {}
    token = _file_data.set(file_data)
    try:
        return Settings(**cli)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        key = ".".join(str(p) for p in loc) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown setting (docs/SERVER.md lists them)")
        elif not loc:
            lines.append(msg)
        elif err["type"] == "missing" or "api_keys" in loc:
            lines.append(f"{key}: {msg}")  # never echo a key
        else:
            lines.append(f"{key}={err.get('input')!r}: {msg}")
    return "invalid configuration: " + "; ".join(lines)
