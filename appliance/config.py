"""Configuration: `config.toml` plus environment overrides, parsed once into frozen dataclasses.

Precedence, lowest first: the dataclass defaults, the TOML file, `APPLIANCE_*`
variables (`APPLIANCE_<SECTION>__<KEY>`, e.g. `APPLIANCE_STORAGE__BACKEND=disk`,
`APPLIANCE_RUNTIME__OPENVINO__DEVICE=GPU`), then the old back end's variables
(`MODEL_PATH`, `BLUR_THRESHOLD`, …; see `LEGACY_ENV`) so a clinic can switch
without rewriting its unit files. Unknown keys are refused; every error names
the key path, the bad value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from collections.abc import Mapping

# The storage, sync and bucket sections are defined by their subsystems; this module composes them.
from .buckets import check_url
from .buckets.config import BucketConfig
from .errors import ConfigError
from .inference.runtimes import RUNTIMES, runtime_config_class
from .inference.runtimes.onnxruntime import LEGACY_DEVICES
from .settings import Check, check_fields, positive, setting
from .security.config import AuthConfig, LimitsConfig, ServerConfig
from .security.exposure import check_exposure
from .storage.config import StorageConfig, check_storage
from .storage.images import check_images
from .sync.config import SyncConfig, check_sync

if TYPE_CHECKING:  # served paths import imaging (OpenCV, PIL): not needed to read a config
    from .inference.paths import Wanted

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class ModelConfig:
    """Which model directory and which of its artifacts to serve."""

    path: Path = Path("models/demo")
    artifact: str = "auto"
    # A model directory in a bucket (MODEL_URL), fetched into cache_dir at start (appliance/modelfetch.py).
    url: str = ""
    cache_dir: Path = Path("models/cache")
    # Ed25519 public keys (PEM files): when set, only a model.json signed by one of them loads
    # (model.json.sig, written by convert --sign-key); checked at fetch and at load.
    trusted_keys: tuple[Path, ...] = ()
    # A version of model.path (a model's directory) to serve instead of the highest: rollback (appliance reload).
    pin_version: str = ""
    # Seconds between looks at model.url for a new version (0 = only at start and on reload).
    poll_interval_s: float = setting(0.0, Check("0 (off) or a number of seconds", at_least=0))
    # `auto` by measurement: time the paths that met their bar on this machine at a version's first start.
    measure_paths: bool = False
    # Prove each path on this machine with the version's verification set before a fast one serves (inference/proof.py).
    prove_paths: bool = True
    # The live parity watch (inference/proof.py): re-run 1 in watch_every answered photos on the reference path.
    watch_every: int = setting(50, Check("0 (off) or a positive number of answers", at_least=0))
    watch_window: int = setting(100, Check("a positive number of sampled photos", at_least=1))

    def __post_init__(self) -> None:
        if self.pin_version and not self.pin_version.isdigit():
            raise ConfigError(f"model.pin_version: expected a version directory's number, or \"\" for the highest; "
                              f"got {self.pin_version!r}")
        if self.pin_version and self.url:
            raise ConfigError(f"model.pin_version: pins a version of model.path; with model.url, point the URL at "
                              f"that version instead ({self.url.rstrip('/')}/{self.pin_version}) and set pin_version = \"\"")


@dataclass(frozen=True)
class RuntimeConfig:
    """The inference back end; each back end's own table is parsed by its module."""

    # OpenVINO by default: on the INT8 artifacts it measured 2.4x the end-to-end
    # throughput of ONNX Runtime on 2 cores, at the same parity (bench/NOTES.md).
    backend: str = "openvino"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> Any:
        """The selected back end's own config object."""
        return self.options[self.backend]


@dataclass(frozen=True)
class InferenceConfig:
    """Queueing and micro-batching in front of the runtime."""

    max_batch: int = positive(4)
    max_wait_ms: float = 2.0
    queue_size: int = positive(32)
    decode_threads: int = positive(2)


@dataclass(frozen=True)
class ImagingConfig:
    """Image acceptance limits and the blur / confidence thresholds."""

    max_pixels: int = positive(64_000_000)
    blur_threshold: float = 100.0
    blur_full_resolution: bool = False
    conf_threshold: float = setting(0.5, Check("a number from 0 to 1", at_least=0.0, at_most=1.0))
    # How photos are decoded: "auto" (the fastest served path convert measured that met
    # the bar), "fast" (DCT-scaled JPEG decode) or "exact" (whole; the reference's tensor).
    decode: Literal["auto", "fast", "exact"] = "auto"


@dataclass(frozen=True)
class PrivacyConfig:
    """What is removed from images before they are kept (appliance/privacy.py)."""

    strip_metadata_on_store: bool = True


@dataclass(frozen=True)
class Config:
    """The whole appliance configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    imaging: ImagingConfig = field(default_factory=ImagingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    bucket: BucketConfig = field(default_factory=BucketConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)


# The old back end's variables and the key each one sets.
LEGACY_ENV: dict[str, tuple[str, ...]] = {
    "MODEL_PATH": ("model", "path"),
    "BLUR_THRESHOLD": ("imaging", "blur_threshold"),
    "CONF_THRESHOLD": ("imaging", "conf_threshold"),
    "STORAGE_DIR": ("storage", "root"),
    "STORAGE_ROOT": ("storage", "root"),  # after STORAGE_DIR: the old server preferred it
    "CASE_ID_START": ("storage", "case_id_start"),
    "BACKSERVER_HOST": ("server", "host"),
    "BACKSERVER_PORT": ("server", "port"),
    "TLS_CERT_FILE": ("server", "tls_cert_file"),
    "TLS_KEY_FILE": ("server", "tls_key_file"),
    "ALLOWED_ORIGINS": ("server", "allowed_origins"),  # comma list; API_KEY is read by security/auth.py
    "ENCRYPT_STORAGE": ("storage", "encrypt"),  # 1/true/yes; DATA_ENCRYPTION_KEY is read by storage/crypto.py
    "MODEL_URL": ("model", "url"),  # a bucket URL (appliance/modelfetch.py)
}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate, return frozen config.

    Relative paths in the file are resolved against the file's directory;
    relative paths from the environment against the working directory.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        base = Path(path).resolve().parent
    raw = _resolve_paths(raw, base)
    _apply_environ(raw, environ)
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a nested mapping (TOML-shaped) into a `Config`."""
    _refuse_unknown(raw, SECTIONS, "")
    sections: dict[str, Any] = {}
    for name, cls in _section_classes().items():
        table = _expect_table(raw.get(name, {}), name)
        if cls is RuntimeConfig:
            sections[name] = _parse_runtime(table)
        else:
            sections[name] = parse_dataclass(cls, table, name)
    config = Config(**sections)
    _check_choices(config)
    return config


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _parse_runtime(table: Mapping[str, Any]) -> RuntimeConfig:
    backend = table.get("backend", RuntimeConfig.backend)
    if backend not in RUNTIMES:
        raise ConfigError(f"runtime.backend: expected one of {', '.join(RUNTIMES)}; got {backend!r}")
    allowed = {"backend": str, **{name: dict for name in RUNTIMES}}
    _refuse_unknown(table, allowed, "runtime")
    options = {}
    for name in RUNTIMES:
        sub = _expect_table(table.get(name, {}), f"runtime.{name}")
        options[name] = parse_dataclass(runtime_config_class(name), sub, f"runtime.{name}")
    return RuntimeConfig(backend=backend, options=types.MappingProxyType(options))


def _check_choices(config: Config) -> None:
    """The rules between keys; each key's own range or choices were checked as it was parsed."""
    check_sync(config.sync)
    check_images(config.storage, sync_enabled=config.sync.enabled)
    check_storage(config.storage)
    if config.model.url:
        check_url(config.model.url, "model.url")
    if config.imaging.blur_full_resolution and config.imaging.decode == "fast":
        raise ConfigError('imaging.decode: "fast" cannot hold with imaging.blur_full_resolution = true, which decodes '
                          'every photo whole; set imaging.decode = "auto" or "exact"')
    if (config.server.tls_cert_file is None) != (config.server.tls_key_file is None):
        raise ConfigError("server.tls_cert_file and server.tls_key_file: expected both or neither")
    check_exposure(config.server, config.server.host)


def parse_dataclass(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """Build a frozen dataclass from a table, converting and checking each field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown(table, fields, where)
    values = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in table.items()}
    section = cls(**values)
    check_fields(section, where)
    return section


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list; got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string; got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path; got {value!r}")
        return Path(value)
    raise TypeError(f"{key}: no converter for {hint!r}")  # a programming error, not a user's


def _refuse_unknown(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> None:
    for key in table:
        if key not in allowed:
            path = f"{where}.{key}" if where else key
            choices = ", ".join(sorted(allowed))
            raise ConfigError(f"{path}: unknown key (expected one of {choices})")


def _expect_table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table; got {value!r}")
    return value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the file's relative paths relative to the file, not to the working directory."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if isinstance(out.get("runtime"), dict):
        out["runtime"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in out["runtime"].items()}
    for path in _path_keys():
        table: Any = out
        for part in path[:-1]:
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict) and isinstance(table.get(path[-1]), str) and table[path[-1]]:
            table[path[-1]] = str(base / table[path[-1]])
        elif isinstance(table, dict) and isinstance(table.get(path[-1]), list):  # a list of paths
            table[path[-1]] = [str(base / v) if isinstance(v, str) and v else v for v in table[path[-1]]]
    return out


def _path_keys() -> list[tuple[str, ...]]:
    """Every key path whose value is a filesystem path, runtime back ends' included."""
    owners: list[tuple[tuple[str, ...], type]] = []
    for section, cls in _section_classes().items():
        if cls is RuntimeConfig:
            owners += [(("runtime", name), runtime_config_class(name)) for name in RUNTIMES]
        else:
            owners.append(((section,), cls))
    return [
        (*where, name)
        for where, cls in owners
        for name, hint in typing.get_type_hints(cls).items()
        if hint is Path or Path in typing.get_args(hint)
    ]


def _apply_environ(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in sorted(environ.items()):
        if name.startswith("APPLIANCE_") and "__" in name:
            path = [part.lower() for part in name[len("APPLIANCE_"):].split("__")]
            _set(raw, path, _env_value(value))
    for name, legacy_path in LEGACY_ENV.items():
        if environ.get(name, "").strip():
            _set(raw, list(legacy_path), environ[name].strip())
    device = environ.get("MODEL_DEVICE", "").strip().lower()
    if device:
        if device not in LEGACY_DEVICES:
            raise ConfigError(f"MODEL_DEVICE: expected one of {', '.join(LEGACY_DEVICES)}; got {device!r}")
        for key, value in LEGACY_DEVICES[device].items():
            _set(raw, list(key), value)


def _env_value(text: str) -> Any:
    """Read an override as a TOML value when it is one (8000, true, ["a"]), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(raw: dict[str, Any], path: list[str], value: Any) -> None:
    table = raw
    for part in path[:-1]:
        nxt = table.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a table")
        table = nxt
    table[path[-1]] = value


def wanted_path(config: Config) -> Wanted:
    """What the settings ask of the model directory: runtime, its precision, artifact, decode."""
    from .inference.paths import Wanted

    decode = "exact" if config.imaging.blur_full_resolution else config.imaging.decode  # it decodes whole anyway
    precision = getattr(config.runtime.selected, "inference_precision", "f32")
    return Wanted(config.runtime.backend, precision, config.model.artifact, decode)
