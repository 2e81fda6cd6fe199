"""The container's health check: `GET /healthz` on the address the running `serve` listens on.

Docker and podman run a HEALTHCHECK as a separate process that knows neither the flags nor
the config file `serve` was started with, so a port written into the Dockerfile is wrong as
soon as a user passes `serve --port` or sets `server.port` in a mounted YAML file. This finds
the `serve` process in /proc (PID 1, or the child of an init such as `podman run --init`),
reads its command line, working directory and environment, and builds its Config exactly as
`serve` did (`cli.serve_overrides`, `load_config`), so the probe follows the port however it
was set. `python -m proxy.healthcheck` exits 0 when /healthz answers 200 and 1 otherwise,
printing one line that says why (podman and docker keep it in the container's health log).
"""

from __future__ import annotations

import http.client
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .cli import serve, serve_overrides
from .config import Config, ConfigError, load_config

PROC = Path("/proc")
# Below the Dockerfile's HEALTHCHECK --timeout=3s, so a hung proxy reads as unhealthy here
# with a reason instead of as a killed check.
PROBE_TIMEOUT = 2.0
# Where a wildcard listen address is reached from inside the same network namespace.
_WILDCARD_PROBE = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class ServingProcess:
    """What `serve` built its Config from: its arguments after `serve`, its working directory
    (a relative `--config` is relative to it) and its environment (`${VAR}` in the YAML)."""

    pid: int
    arguments: list[str]
    cwd: Path
    environ: dict[str, str]


def serve_arguments(cmdline: list[str]) -> list[str] | None:
    """The arguments after `serve` when `cmdline` runs the proxy's serve command, else None.

    The console script shows up as `python /venv/bin/resumable-proxy serve ...` (the kernel
    runs the script's interpreter) or `resumable-proxy serve ...`; `python -m proxy serve ...`
    is the other way to start it.
    """
    if cmdline and Path(cmdline[0]).name == "resumable-proxy":
        command = cmdline[1:]
    elif len(cmdline) > 1 and Path(cmdline[1]).name == "resumable-proxy":
        command = cmdline[2:]
    elif cmdline[1:3] == ["-m", "proxy"]:
        command = cmdline[3:]
    else:
        return None
    return command[1:] if command[:1] == ["serve"] else None


def read_process(pid: int, proc: Path = PROC) -> ServingProcess | None:
    """The process `pid` if it runs `serve`; None if it runs anything else or is gone."""
    directory = proc / str(pid)
    try:
        cmdline = (directory / "cmdline").read_bytes()
    except OSError:
        return None
    arguments = serve_arguments([os.fsdecode(part) for part in cmdline.split(b"\0")[:-1]])
    if arguments is None:
        return None
    environ = {}
    for entry in (directory / "environ").read_bytes().split(b"\0"):
        name, sep, value = os.fsdecode(entry).partition("=")
        if sep:
            environ[name] = value
    return ServingProcess(pid, arguments, directory / "cwd", environ)


def find_serving_process(proc: Path = PROC) -> ServingProcess | None:
    """The lowest-numbered process running `serve`: PID 1 in a plain container, the init's
    child under `--init`; with `server.workers` the workers share the first one's config."""
    own = os.getpid()
    pids = sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
    for pid in pids:
        if pid != own and (process := read_process(pid, proc)) is not None:
            return process
    return None


def serving_config(process: ServingProcess) -> Config:
    """The Config `serve` built: the same flag parsing, file, environment and defaults."""
    params = dict(serve.make_context("serve", list(process.arguments)).params)
    config_path = params.pop("config_path")
    path = process.cwd / config_path if config_path is not None else None
    return load_config(path, serve_overrides(**params), process.environ)


def probe_address(config: Config) -> tuple[str, int]:
    host = config.server.host
    return _WILDCARD_PROBE.get(host, host), config.server.port


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """(healthy, one line saying why) for `GET /healthz` on host:port."""
    where = f"GET /healthz on {host}:{port}"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read(512).decode(errors="replace").strip()
    except OSError as exc:
        return False, f"{where}: {exc}"
    finally:
        connection.close()
    return response.status == 200, f"{where}: {response.status} {body}"


def check(proc: Path = PROC) -> tuple[bool, str]:
    process = find_serving_process(proc)
    if process is None:
        return False, "no `resumable-proxy serve` process in this container"
    try:
        config = serving_config(process)
    except ConfigError as exc:
        return False, "; ".join(exc.problems)
    except (click.ClickException, OSError) as exc:
        return False, f"cannot read how process {process.pid} was started: {exc}"
    host, port = probe_address(config)
    if port == 0:
        return False, "server.port is 0 (an ephemeral port): no fixed address to probe"
    return probe(host, port)


def main() -> int:
    healthy, reason = check()
    click.echo(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
