"""The container health check finds `serve` in /proc and probes the port it was configured with.

The image's own check runs in tests/test_container.py; here the same code reads a real proxy
process on this machine (flags, a relative config file, ${VAR} from its environment) and a
/proc tree laid out by hand for the choice between processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.healthcheck import (
    ServingProcess,
    check,
    find_serving_process,
    probe,
    probe_address,
    read_process,
    serve_arguments,
    serving_config,
)

from .helpers import ROOT, free_port, make_config


@pytest.mark.parametrize(
    ("cmdline", "arguments"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/resumable-proxy", "serve", "--port", "9"],
         ["--port", "9"]),
        (["resumable-proxy", "serve"], []),
        (["python3", "-m", "proxy", "serve", "--config", "a.yaml"], ["--config", "a.yaml"]),
        (["/opt/venv/bin/python", "/opt/venv/bin/resumable-proxy", "mock-upstream"], None),
        (["/opt/venv/bin/python", "/opt/venv/bin/resumable-proxy"], None),
        (["python", "-m", "proxy.healthcheck"], None),
        (["catatonit", "--", "resumable-proxy", "serve"], None),
        (["sh", "-c", "resumable-proxy serve"], None),
        (["redis-server", "*:6379"], None),
        ([], None),
    ],
)  # fmt: skip
def test_serve_arguments_recognise_only_the_serve_command(
    cmdline: list[str], arguments: list[str] | None
) -> None:
    assert serve_arguments(cmdline) == arguments


@pytest.fixture
def configured_proxy(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`serve` started the way a container user might: a relative --config whose port comes
    from the environment, and a flag on top."""
    port = free_port()
    (tmp_path / "proxy.yaml").write_text('server:\n  port: "${HEALTH_TEST_PORT}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", "proxy.yaml", "--data-dir", "data",
         "--host", "127.0.0.1"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HEALTH_TEST_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process, port
    finally:
        process.kill()
        process.wait(10)


def test_reads_the_port_a_running_serve_was_configured_with(
    configured_proxy: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = configured_proxy
    for _ in range(150):
        healthy, reason = probe("127.0.0.1", port)
        if healthy or process.poll() is not None:
            break
        time.sleep(0.1)
    assert healthy, reason
    assert reason.startswith(f"GET /healthz on 127.0.0.1:{port}: 200 ")
    # Read once it listens: right after the fork /proc still shows the parent's command line.
    serving = read_process(process.pid)
    assert serving is not None
    assert serving.arguments == [
        "--config",
        "proxy.yaml",
        "--data-dir",
        "data",
        "--host",
        "127.0.0.1",
    ]
    assert probe_address(serving_config(serving)) == ("127.0.0.1", port)


def test_probe_of_a_port_nobody_listens_on_is_unhealthy_with_the_reason() -> None:
    healthy, reason = probe("127.0.0.1", free_port(), timeout=2)
    assert not healthy
    assert "refused" in reason.lower()


def test_wildcard_listen_addresses_are_probed_on_loopback(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"server.host": "0.0.0.0", "server.port": 8080})
    assert probe_address(config) == ("127.0.0.1", 8080)
    config = make_config(tmp_path, **{"server.host": "::", "server.port": 8080})
    assert probe_address(config) == ("::1", 8080)
    config = make_config(tmp_path, **{"server.host": "10.1.2.3", "server.port": 81})
    assert probe_address(config) == ("10.1.2.3", 81)


def fake_process(proc: Path, pid: int, cmdline: list[str], environ: dict[str, str]) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in cmdline))
    (directory / "environ").write_bytes(
        b"".join(f"{name}={value}".encode() + b"\0" for name, value in environ.items())
    )
    (directory / "cwd").symlink_to(proc.parent)


def test_finds_the_lowest_serve_process_past_an_init_and_other_programs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 1, ["catatonit", "--", "resumable-proxy", "serve"], {})
    fake_process(proc, 7, ["python", "-m", "proxy.healthcheck"], {})
    fake_process(proc, 12, ["/venv/bin/python", "/venv/bin/resumable-proxy", "serve",
                            "--config", "rp.yaml"], {"P": "9090"})  # fmt: skip
    fake_process(proc, 30, ["resumable-proxy", "serve", "--port", "1"], {})
    (proc / "self").mkdir()
    (tmp_path / "rp.yaml").write_text('server:\n  host: 0.0.0.0\n  port: "${P}"\n')
    serving = find_serving_process(proc)
    assert serving == ServingProcess(
        12, ["--config", "rp.yaml"], proc / "12" / "cwd", {"P": "9090"}
    )
    assert probe_address(serving_config(serving)) == ("127.0.0.1", 9090)


def test_check_without_a_serve_process_is_unhealthy(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 1, ["redis-server"], {})
    assert check(proc) == (False, "no `resumable-proxy serve` process in this container")


def test_check_reports_the_config_problem_of_the_serving_process(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 1, ["resumable-proxy", "serve", "--port", "eighty"], {})
    healthy, reason = check(proc)
    assert not healthy
    assert "server.port" in reason
