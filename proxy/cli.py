"""The `resumable-proxy` command: serve, mock-upstream, sessions. Nothing else lives here.

Flags default to None so that the config file decides unless a flag is given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .config import Config, ConfigError, load_config
from .errors import ProxyError
from .storage.base import StorageError


def _fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(line, err=True)
    sys.exit(code)


def _load(config_path: str | None, overrides: dict[str, Any]) -> Config:
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(exc.problems)


@click.group()
@click.version_option(package_name="resumable-proxy")
def main() -> None:
    """resumable-proxy: make LLM streams survive refreshes, drops and restarts."""


@main.command()
@click.option("--config", "config_path", type=str, default=None, help="YAML config file.")
@click.option("--host", default=None, help="Listen address (server.host).")
@click.option("--port", default=None, help="Listen port (server.port).")
@click.option("--upstream", default=None, help="Upstream base URL, or 'mock' (upstream.url).")
@click.option("--data-dir", default=None, help="Log directory (storage.dir).")
@click.option("--log-level", default=None, help="debug, info, warning or error.")
def serve(
    config_path: str | None,
    host: str | None,
    port: str | None,
    upstream: str | None,
    data_dir: str | None,
    log_level: str | None,
) -> None:
    """Run the proxy."""
    config = _load(config_path, serve_overrides(host, port, upstream, data_dir, log_level))
    from .server import serve as run_server

    sys.exit(run_server(config))


def serve_overrides(
    host: str | None,
    port: str | None,
    upstream: str | None,
    data_dir: str | None,
    log_level: str | None,
) -> dict[str, str | None]:
    """The config keys `serve`'s flags set (None leaves them to the file or the default).
    The container's health check builds a running proxy's Config through this too."""
    return {
        "server.host": host,
        "server.port": port,
        "upstream.url": upstream,
        "storage.dir": data_dir,
        "server.log_level": log_level,
    }


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8081, show_default=True)
@click.option("--tokens", type=click.IntRange(0), default=64, show_default=True)
@click.option("--interval-ms", type=click.FloatRange(0), default=20.0, show_default=True)
def mock_upstream(host: str, port: int, tokens: int, interval_ms: float) -> None:
    """Serve the built-in OpenAI-compatible mock upstream alone."""
    from .mock import run_mock_upstream

    run_mock_upstream(host, port, tokens, interval_ms)


@main.group()
def sessions() -> None:
    """Read a data dir offline (safe while a proxy runs on it)."""


# Ids may begin with "-" (base64url), so an id must never be taken for an unknown option.
_takes_session_id = {"ignore_unknown_options": True}
_data_dir_option = click.option("--data-dir", default=None, help="Data dir (default ./data).")
_config_option = click.option("--config", "config_path", default=None, help="YAML config file.")


def _offline_dir(config_path: str | None, data_dir: str | None) -> Path:
    config = _load(config_path, {"storage.dir": data_dir})
    return config.storage.dir


@sessions.command("ls")
@_data_dir_option
@_config_option
def sessions_ls(data_dir: str | None, config_path: str | None) -> None:
    """List sessions, newest first."""
    from .offline import list_sessions

    _run_offline(list_sessions, _offline_dir(config_path, data_dir))


@sessions.command("show", context_settings=_takes_session_id)
@click.argument("session_id")
@_data_dir_option
@_config_option
def sessions_show(session_id: str, data_dir: str | None, config_path: str | None) -> None:
    """Show one session's metadata and latency figures."""
    from .offline import show_session

    _run_offline(show_session, _offline_dir(config_path, data_dir), session_id)


@sessions.command("cat", context_settings=_takes_session_id)
@click.argument("session_id")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@_data_dir_option
@_config_option
def sessions_cat(
    session_id: str, offset: int, data_dir: str | None, config_path: str | None
) -> None:
    """Print a session's raw SSE from event OFFSET+1."""
    from .offline import cat_session

    _run_offline(cat_session, _offline_dir(config_path, data_dir), session_id, offset)


def _run_offline(command: Any, *args: Any) -> None:
    try:
        command(*args)
    except ProxyError as exc:
        _fail(f"error: {exc.message}", code=1)
    except (StorageError, LookupError, ValueError) as exc:
        _fail(f"error: {exc}", code=1)
