"""Configuration: defaults < YAML file < CLI flags, built once into a frozen tree.

Nothing else in the proxy reads the environment or the YAML file: `load_config` is the only
door, and every problem it finds is reported in one pass, one line per key, so an operator
fixes a broken file in one edit instead of one restart per typo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Used with fullmatch: `$` would also accept a final newline ("abcdefgh\n" from `%0A`).
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,128}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


class ConfigError(Exception):
    """All problems found while loading, one `config: key: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout: float = 30.0  # a request body not received in full by then gets 408
    max_connections: int = 10_000  # open client connections; beyond it new ones get 503
    shutdown_grace: float = 10.0
    cors_origins: tuple[str, ...] = ()
    demo: bool | None = None  # None: on exactly when the upstream is the built-in mock
    log_level: str = "info"
    log_format: str = "text"
    workers: int = 1  # processes sharing the port (SO_REUSEPORT); > 1 needs the Redis store


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "mock"
    api_key: str | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0

    @property
    def is_mock(self) -> bool:
        return self.url == "mock"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    header: str = "X-Resume-Session-Id"
    event_ids: bool = True
    keepalive: float = 15.0
    max_duration: float = 600.0
    # The first of these present on the creating request is the credential a session is
    # bound to: OpenAI clients send Authorization, Anthropic x-api-key, Azure api-key.
    bind_headers: tuple[str, ...] = ("Authorization", "x-api-key", "api-key")
    tokens: bool = True  # X-Resume-Token capability tokens
    token_secret: str | None = None  # None: a random key kept by the store


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    ttl: float = 86400.0
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = "disk"
    dir: Path = Path("./data")
    segment_bytes: int = 32 * 1024 * 1024
    fsync: str = "interval"
    fsync_interval_ms: int = 100
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    redis_url: str | None = None
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    redis_wait_replicas: int = 0  # replicas that must have a write before clients see it


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None = None


@dataclass(frozen=True, slots=True)
class MockConfig:
    """Shape of the built-in mock upstream's answers (`upstream.url: mock`)."""

    tokens: int = 64
    interval_ms: float = 20.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    mock: MockConfig = field(default_factory=MockConfig)

    @property
    def demo_enabled(self) -> bool:
        if self.server.demo is None:
            return self.upstream.is_mock
        return self.server.demo


# --- value parsers: each returns the typed value or raises ValueError with the message ---


def _as_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _as_optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _as_str(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _as_optional_bool(value: Any) -> bool | None:
    return None if value is None else _as_bool(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _as_duration(value: Any) -> float:
    """Seconds; accepts numbers (seconds) and strings like `150ms`, `10s`, `10m`, `24h`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 10s, 5m or 24h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"expected a duration such as 10s, 5m or 24h, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return seconds


def _as_size(value: Any) -> int:
    """Bytes; accepts integers and strings like `64MiB`, `512kb`, `1GiB`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 64MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"expected a size such as 64MiB, got {value!r}")
        unit = match.group(2).lower() if match.group(2) else None
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size < 0:
        raise ValueError(f"expected a size >= 0, got {value!r}")
    return size


def _as_optional_size(value: Any) -> int | None:
    if value is None or value == 0 or value == "":
        return None
    return _as_size(value)


def _as_str_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(_as_str(item) for item in value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _as_str(value).lower() if isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _in_range(parse: Callable[[Any], Any], low: float, high: float) -> Callable[[Any], Any]:
    def checked(value: Any) -> Any:
        typed = parse(value)
        if not low <= typed <= high:
            raise ValueError(f"expected a value between {low:g} and {high:g}, got {value!r}")
        return typed

    return checked


def _header_name(value: Any) -> str:
    text = _as_str(value)
    if not _HEADER_NAME.fullmatch(text):
        raise ValueError(f"expected an HTTP header name, got {value!r}")
    return text


def _header_names(value: Any) -> tuple[str, ...]:
    names = tuple(_header_name(item) for item in _as_str_list(value))
    if not names:
        raise ValueError("expected at least one header name")
    return names


def _renamed(new: str) -> Callable[[Any], Any]:
    """A key that no longer exists under its old name: refused with the new one, because
    keeping its old meaning silently (one header) would leave sessions of clients that send
    another credential header readable by anyone."""

    def refuse(value: Any) -> Any:
        raise ValueError(f"renamed to {new}")

    return refuse


def _token_secret(value: Any) -> str | None:
    text = _as_optional_str(value)
    if text is not None and len(text) < 16:
        raise ValueError("expected at least 16 characters (an unguessable key)")
    return text


def _upstream_url(value: Any) -> str:
    text = _as_str(value).strip()
    if text == "mock":
        return text
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"expected mock or an http(s):// URL, got {value!r}")
    return text.rstrip("/")


def _path(value: Any) -> Path:
    text = _as_str(value)
    if not text:
        raise ValueError("expected a directory path, got ''")
    return Path(text)


# Every key: section -> key -> parser. The dataclass defaults above are the only defaults.
_SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "server": {
        "host": _as_str,
        "port": _in_range(_as_int, 0, 65535),
        "max_body_bytes": _in_range(_as_size, 1, 2**40),
        "body_timeout": _in_range(_as_duration, 0.001, 86400),
        "max_connections": _in_range(_as_int, 1, 10_000_000),
        "shutdown_grace": _as_duration,
        "cors_origins": _as_str_list,
        "demo": _as_optional_bool,
        "log_level": _one_of("debug", "info", "warning", "error"),
        "log_format": _one_of("text", "json"),
        "workers": _in_range(_as_int, 1, 256),
    },
    "upstream": {
        "url": _upstream_url,
        "api_key": _as_optional_str,
        "connect_timeout": _in_range(_as_duration, 0.001, 3600),
        "idle_timeout": _in_range(_as_duration, 0.001, 86400),
    },
    "session": {
        "header": _header_name,
        "event_ids": _as_bool,
        "keepalive": _in_range(_as_duration, 0.01, 3600),
        "max_duration": _in_range(_as_duration, 0.01, 7 * 86400),
        "bind_headers": _header_names,
        "bind_header": _renamed("session.bind_headers (a list, e.g. [Authorization])"),
        "tokens": _as_bool,
        "token_secret": _token_secret,
    },
    "storage": {
        "backend": _one_of("disk", "redis"),
        "dir": _path,
        "segment_bytes": _in_range(_as_size, 4096, 2**40),
        "fsync": _one_of("always", "interval", "never"),
        "fsync_interval_ms": _in_range(_as_int, 1, 60_000),
        "retention": {},  # a nested section, handled below
        "redis_url": _as_optional_str,
        "redis_cluster": _as_bool,
        "redis_wait_replicas": _in_range(_as_int, 0, 16),
    },
    "admin": {"token": _as_optional_str},
    "mock": {
        "tokens": _in_range(_as_int, 0, 10_000_000),
        "interval_ms": _in_range(_as_duration, 0, 60_000),
    },
}
_RETENTION_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "ttl": _as_duration,
    "max_bytes": _as_optional_size,
}
_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "session": SessionConfig,
    "storage": StorageConfig,
    "admin": AdminConfig,
    "mock": MockConfig,
}


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset VAR without default raises KeyError."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _ENV_REF.sub(replace, text)


def _expand_tree(node: Any, key: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {
            k: _expand_tree(v, f"{key}.{k}" if key else str(k), environ, problems)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_tree(v, key, environ, problems) for v in node]
    if isinstance(node, str) and "${" in node:
        try:
            expanded = expand_env(node, environ)
        except KeyError as missing:
            problems.append(f"config: {key}: environment variable {missing.args[0]} is not set")
            return node
        # A whole-value reference is typed like a YAML scalar would be: `${FLAG}` -> false.
        if _ENV_REF.fullmatch(node.strip()):
            try:
                return yaml.safe_load(expanded) if expanded.strip() else expanded
            except yaml.YAMLError:
                return expanded
        return expanded
    return node


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config: {path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"config: {path}: cannot read file: {reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"config: {path}: {problem}{where}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config: {path}: expected a mapping of sections at the top level"])
    return data


def _typed_section(
    name: str,
    raw: Any,
    schema: Mapping[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"config: {name}: expected a mapping, got {raw!r}")
        return {}
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in schema:
            problems.append(f"config: {full}: unknown key")
            continue
        if name == "storage" and key == "retention":
            retention = _typed_section(full, value, _RETENTION_SCHEMA, problems)
            typed[key] = RetentionConfig(**retention)
            continue
        try:
            typed[key] = schema[key](value)
        except ValueError as exc:
            problems.append(f"config: {full}: {exc}")
    return typed


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Flags arrive as dotted keys (`server.port`); None means the flag was not given."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config. Raises ConfigError listing every problem found."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data = _expand_tree(data, "", environ, problems)
    _apply_overrides(data, overrides or {})

    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in _SCHEMA:
            problems.append(f"config: {name}: unknown key")
            continue
        sections[name] = _SECTIONS[name](**_typed_section(name, raw, _SCHEMA[name], problems))
    config = Config(**sections)
    problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[str]:
    problems = []
    if config.storage.backend == "redis" and not config.storage.redis_url:
        problems.append("config: storage.redis_url: required when storage.backend is redis")
    if config.storage.redis_url and not re.match(r"^rediss?://", config.storage.redis_url):
        problems.append(
            f"config: storage.redis_url: expected redis:// or rediss://, got "
            f"{config.storage.redis_url!r}"
        )
    if config.server.workers > 1 and config.storage.backend != "redis":
        problems.append(
            f"config: server.workers: {config.server.workers} workers need storage.backend "
            "redis (the disk log belongs to one process, so workers could not resume each "
            "other's sessions)"
        )
    if config.server.workers > 1 and config.server.port == 0:
        problems.append("config: server.workers: several workers need a fixed server.port, not 0")
    return problems
