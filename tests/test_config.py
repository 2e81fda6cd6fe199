"""Config: layering, env expansion, and one clear line per problem (exit 2 from the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={}, **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def test_example_file_holds_every_default() -> None:
    assert load_config(ROOT / "config" / "proxy.yaml", environ={}) == Config()


def test_example_file_names_every_key() -> None:
    text = (ROOT / "config" / "proxy.yaml").read_text()
    for section in ("server", "upstream", "session", "storage", "admin"):
        fields = getattr(Config(), section).__dataclass_fields__
        for key in fields:
            assert f"{key}:" in text, f"{section}.{key} missing from config/proxy.yaml"


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  host: 0.0.0.0\nstorage:\n  fsync: always\n")
    config = load_config(path, {"server.port": "9100", "storage.dir": "/tmp/x"}, environ={})
    assert config.server.port == 9100
    assert config.server.host == "0.0.0.0"
    assert config.storage.fsync == "always"
    assert str(config.storage.dir) == "/tmp/x"


def test_flag_none_means_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n")
    assert load_config(path, {"server.port": None}, environ={}).server.port == 9000


def test_env_expansion_types_whole_value_references(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "session:\n  event_ids: ${FLAG}\nserver:\n  port: ${PORT:-8181}\n"
        "upstream:\n  api_key: ${KEY}\n  url: http://${HOST:-localhost}:9\n",
    )
    config = load_config(path, environ={"FLAG": "false", "KEY": "sk-1", "HOST": "up"})
    assert config.session.event_ids is False
    assert config.server.port == 8181
    assert config.upstream.api_key == "sk-1"
    assert config.upstream.url == "http://up:9"


def test_unset_env_without_default_names_key_and_variable(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "upstream:\n  api_key: ${NOPE}\n") == [
        "config: upstream.api_key: environment variable NOPE is not set"
    ]


def test_durations_and_sizes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "session:\n  keepalive: 1500ms\n  max_duration: 2m\nstorage:\n  segment_bytes: 1MiB\n"
        "  retention:\n    ttl: 1h\n    max_bytes: 2GiB\n",
    )
    config = load_config(path, environ={})
    assert config.session.keepalive == 1.5
    assert config.session.max_duration == 120
    assert config.storage.segment_bytes == 1024 * 1024
    assert config.storage.retention.ttl == 3600
    assert config.storage.retention.max_bytes == 2 * 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "storage:\n  fsync: sometimes\n",
            "config: storage.fsync: expected one of always, interval, never, got 'sometimes'",
        ),
        (
            "server:\n  port: 70000\n",
            "config: server.port: expected a value between 0 and 65535, got 70000",
        ),
        ("server:\n  port: abc\n", "config: server.port: expected an integer, got 'abc'"),
        ("server:\n  port: true\n", "config: server.port: expected an integer, got True"),
        ("server:\n  colour: blue\n", "config: server.colour: unknown key"),
        ("colour: blue\n", "config: colour: unknown key"),
        (
            "session:\n  event_ids: maybe\n",
            "config: session.event_ids: expected true or false, got 'maybe'",
        ),
        (
            "session:\n  keepalive: soon\n",
            "config: session.keepalive: expected a duration such as 10s, 5m or 24h, got 'soon'",
        ),
        (
            "storage:\n  segment_bytes: lots\n",
            "config: storage.segment_bytes: expected a size such as 64MiB, got 'lots'",
        ),
        (
            "storage:\n  retention:\n    forever: 1\n",
            "config: storage.retention.forever: unknown key",
        ),
        (
            "upstream:\n  url: ftp://x\n",
            "config: upstream.url: expected mock or an http(s):// URL, got 'ftp://x'",
        ),
        (
            "session:\n  header: 'bad header'\n",
            "config: session.header: expected an HTTP header name, got 'bad header'",
        ),
        ("server: 5\n", "config: server: expected a mapping, got 5"),
        (
            "storage:\n  backend: redis\n",
            "config: storage.redis_url: required when storage.backend is redis",
        ),
        (
            "server:\n  workers: 2\n",
            "config: server.workers: 2 workers need storage.backend redis (the disk log "
            "belongs to one process, so workers could not resume each other's sessions)",
        ),
        (
            "server:\n  workers: 0\n",
            "config: server.workers: expected a value between 1 and 256, got 0",
        ),
        (
            "server:\n  workers: 2\n  port: 0\nstorage:\n  backend: redis\n"
            "  redis_url: redis://r:6379\n",
            "config: server.workers: several workers need a fixed server.port, not 0",
        ),
        (
            "storage:\n  redis_cluster: sometimes\n",
            "config: storage.redis_cluster: expected true or false, got 'sometimes'",
        ),
        (
            "storage:\n  redis_wait_replicas: -1\n",
            "config: storage.redis_wait_replicas: expected a value between 0 and 16, got -1",
        ),
    ],
)
def test_each_bad_value_is_one_line_naming_its_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems_of(tmp_path, text) == [expected]


def test_all_problems_reported_in_one_pass(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "server:\n  port: x\n  nope: 1\nstorage:\n  fsync: x\n")
    assert len(problems) == 3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml", environ={})
    assert caught.value.problems == [f"config: {tmp_path / 'absent.yaml'}: file not found"]


def test_directory_instead_of_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path, environ={})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "server:\n  port: [1, 2\n")
    assert len(problems) == 1 and "line" in problems[0]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_cli_bad_port_is_one_line_and_exit_2() -> None:
    result = run_cli("serve", "--port", "eighty")
    assert result.returncode == 2
    assert result.stderr.strip() == "config: server.port: expected an integer, got 'eighty'"


def test_cli_bad_config_lists_every_problem_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  fsync: x\nserver:\n  extra: 1\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config: storage.fsync: expected one of always, interval, never, got 'x'",
        "config: server.extra: unknown key",
    ]


def test_cli_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "file not found" in result.stderr and "Traceback" not in result.stderr
