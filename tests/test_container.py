"""The sidecar image built and run for real: podman, a Debian base, the openai SDK through it.

The image is built once per run from the repository's Dockerfile (on a Debian bookworm base
made with mmdebstrap, see tests/podman.py) and runs its default command, which serves the
built-in mock upstream. The tests run in file order on one container and one /data volume:
the last one stops it mid-stream and checks, from a fresh container on the same volume, that
every session the earlier ones made is there and none is marked lost.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from proxy.mock import answer_tokens

from .helpers import ROOT, chat_stream, event_ids, missing_tool, read_events
from .podman import (
    BASE,
    REDIS,
    Container,
    Podman,
    build_image,
    build_wheels,
    compose_available,
    ensure_image,
    tools_available,
    unique_name,
    wheel_interpreter,
)

pytestmark = pytest.mark.skipif(not tools_available(), reason="podman or mmdebstrap is missing")

API_KEY = "sk-container-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "say something through the sidecar"
# Bounds `podman stop`, which itself waits up to the container's stop timeout (30s).
STOP_WAIT_S = 60


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image, built for this run and removed after it (the base stays cached)."""
    workdir = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    made = ensure_image(podman, BASE, workdir)
    based = time.monotonic()
    wheels = workdir / "wheels"
    build_wheels(wheel_interpreter(podman, BASE.tag), wheels)
    wheeled = time.monotonic()
    tag = f"localhost/{unique_name('resumable-proxy-test')}:latest"
    try:
        build_image(podman, tag, BASE.tag, wheels)
        built = time.monotonic()
        size = podman.inspect(tag, "{{.Size}}")
        print(
            f"\ncontainer: base {'made' if made else 'cached'} in {based - started:.1f}s, "
            f"wheels {wheeled - based:.1f}s, build {built - wheeled:.1f}s, "
            f"image {int(size) / 1e6:.0f} MB"
        )
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def volume(podman: Podman, image: str) -> Iterator[str]:
    name = unique_name("rp-test-data")
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def proxy(podman: Podman, image: str, volume: str) -> Iterator[Container]:
    """The image's own command (`serve` on 8080, /data, the built-in mock upstream)."""
    container = Container(podman, image, volume)
    try:
        container.run()
        print(f"\ncontainer: run to healthy in {container.seconds_to_healthy:.2f}s")
        yield container
    finally:
        container.remove()


def sdk(container: Container) -> OpenAI:
    return OpenAI(base_url=container.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def session_info(http: httpx.Client, container: Container, session_id: str) -> Any:
    response = http.get(f"{container.url}/sessions/{session_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_sdk_streams_a_completion_through_the_container(proxy: Container) -> None:
    with sdk(proxy) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            extra_body={"mock_tokens": 12, "mock_interval_ms": 5},
        )
        session_id = raw.headers["X-Resume-Session-Id"]
        chunks = list(raw.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(answer_tokens(PROMPT, 12))
    with httpx.Client(timeout=30) as http:
        assert session_info(http, proxy, session_id)["state"] == "complete"


def test_proxy_runs_as_uid_10001_and_owns_the_data_volume(
    podman: Podman, image: str, proxy: Container
) -> None:
    assert podman.inspect(image, "{{.Config.User}}") == "10001:10001"
    status = dict(line.split(":", 1) for line in proxy.exec("cat", "/proc/1/status").splitlines())
    assert status["Uid"].split() == ["10001"] * 4
    assert status["Gid"].split() == ["10001"] * 4
    # PID 1 is the proxy itself (exec form), so `podman stop`'s SIGTERM reaches it.
    assert b"/resumable-proxy\0serve\0" in proxy.exec("cat", "/proc/1/cmdline").encode()
    assert proxy.exec("stat", "-c", "%u:%g:%a", "/data").strip() == "10001:10001:700"
    # Debian's own `proxy` user (uid 13) is still there: the image's user does not clash.
    assert proxy.exec("getent", "passwd", "proxy").split(":")[2] == "13"
    assert proxy.exec("getent", "passwd", "10001").startswith("resumable-proxy:")


def test_podman_healthcheck_reports_healthy(podman: Podman, proxy: Container) -> None:
    check = podman("healthcheck", "run", proxy.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    health = podman.inspect(proxy.name, "{{json .State.Health}}")
    assert health["Status"] == "healthy"
    assert "GET /healthz on 127.0.0.1:8080: 200" in health["Log"][-1]["Output"]


def test_healthcheck_follows_the_port_set_in_a_mounted_config_file(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text('server:\n  host: 0.0.0.0\n  port: "${PROXY_PORT}"\nstorage:\n  dir: /data\n')
    config.chmod(0o644)
    port_env = "PROXY_PORT=9090"
    volume = unique_name("rp-test-port")
    podman("volume", "create", volume)
    container = Container(
        podman,
        image,
        volume,
        args=["serve", "--config", "/etc/resumable-proxy/proxy.yaml"],
        run_options=("--volume", f"{config}:/etc/resumable-proxy/proxy.yaml:ro", "--env", port_env),
        container_port=9090,
    )
    try:
        container.run()
        health = podman.inspect(container.name, "{{json .State.Health}}")
        nothing_on_8080 = container.exec(
            "python", "-c",
            "import socket\ntry:\n socket.create_connection(('127.0.0.1', 8080), 2)\n"
            "except ConnectionRefusedError:\n print('refused')",
        )  # fmt: skip
        answer = httpx.get(container.url + "/healthz", timeout=10)
    finally:
        container.remove()
        podman("volume", "rm", "--force", volume, check=False)
    assert health["Status"] == "healthy"
    assert "GET /healthz on 127.0.0.1:9090: 200" in health["Log"][-1]["Output"]
    assert nothing_on_8080.strip() == "refused"
    assert answer.json()["status"] == "ok"


def test_session_survives_podman_restart(podman: Podman, proxy: Container) -> None:
    with httpx.Client(timeout=30) as http:
        with chat_stream(proxy.url, 8, 5, AUTH) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            body = response.read()
        podman("restart", proxy.name, timeout=60)
        proxy.wait_healthy()
        replay = http.get(f"{proxy.url}/sessions/{session_id}/events", headers=AUTH)
        info = session_info(http, proxy, session_id)
    assert replay.content == body
    assert info["state"] == "complete"
    assert event_ids(body) == list(range(1, 12))


def test_podman_stop_lets_a_live_stream_finish_exits_0_and_marks_nothing_lost(
    podman: Podman, image: str, volume: str, proxy: Container
) -> None:
    with httpx.Client(timeout=30) as http:
        with chat_stream(proxy.url, 40, 50, AUTH) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            chunks = response.iter_raw()
            seen = read_events(chunks, 3)
            stop = podman.popen("stop", proxy.name)
            rest = b"".join(chunks)
        assert stop.wait(STOP_WAIT_S) == 0, stop.communicate()
        state = podman.inspect(proxy.name, "{{json .State}}")
        # A fresh container on the same volume: what the stopped one left in /data.
        proxy.remove()
        again = Container(podman, image, volume).run()
        try:
            info = session_info(http, again, session_id)
            replay = http.get(f"{again.url}/sessions/{session_id}/events", headers=AUTH).content
            listed = http.get(again.url + "/sessions", headers=AUTH).json()
        finally:
            again.remove()
    whole = seen + rest
    assert state["ExitCode"] == 0, state
    assert event_ids(whole) == list(range(1, 44))
    assert whole.endswith(b"data: [DONE]\n\n")
    assert info["state"] == "complete"
    assert replay == whole
    # Every session this volume holds (the earlier tests' too) ended complete: none lost.
    sessions = listed["data"]
    assert session_id in {session["id"] for session in sessions}
    assert {session["state"] for session in sessions} == {"complete"}


def _image_healthcheck(podman: Podman, image: str) -> dict[str, Any]:
    output = podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout
    return dict(json.loads(output))


def _seconds(duration: str) -> int:
    assert duration.endswith("s"), duration
    return int(duration[:-1])


def test_compose_example_names_the_image_volume_and_health_check(
    podman: Podman, image: str
) -> None:
    compose = yaml.safe_load((ROOT / "examples" / "compose.yaml").read_text())
    proxy = compose["services"]["llm-proxy"]
    assert proxy["image"] == "resumable-proxy"  # the README's `podman build -t resumable-proxy`
    data = [mount for mount in proxy["volumes"] if mount.split(":")[1] == "/data"]
    assert len(data) == 1 and data[0].split(":")[0] in compose["volumes"]
    assert "/data" in podman.inspect(image, "{{json .Config.Volumes}}")
    check, own = proxy["healthcheck"], _image_healthcheck(podman, image)
    assert check["test"] == own["Test"]
    for key, field in (
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("start_period", "StartPeriod"),
    ):
        assert _seconds(check[key]) * 10**9 == own[field], key
    assert check["retries"] == own["Retries"]
    # compose's stop grace above the proxy's own (examples/proxy.yaml), so live streams finish
    grace = yaml.safe_load((ROOT / "examples" / "proxy.yaml").read_text())["server"]
    assert _seconds(proxy["stop_grace_period"]) > _seconds(grace["shutdown_grace"])
    app = compose["services"]["app"]
    assert app["depends_on"]["llm-proxy"]["condition"] == "service_healthy"
    assert json.dumps(app["environment"]).count("http://llm-proxy:8080/v1") == 1


# The example's app is the user's own; here it is the proxy image running this script, which
# streams a chat completion through OPENAI_BASE_URL the way an app's SDK would (podman-compose
# starts services in order but does not wait for `service_healthy`, hence the retries).
APP_SCRIPT = """
import json, os, time, urllib.request
request = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions",
    data=json.dumps({"model": "m", "stream": True, "mock_tokens": 6, "mock_interval_ms": 5,
                     "messages": [{"role": "user", "content": os.environ["APP_PROMPT"]}]}).encode(),
    headers={"Content-Type": "application/json",
             "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
)
for attempt in range(120):
    try:
        response = urllib.request.urlopen(request, timeout=10)
        break
    except OSError:
        time.sleep(0.5)
text = ""
for line in response:
    if line.startswith(b"data: {"):
        for choice in json.loads(line[6:])["choices"]:
            text += choice["delta"].get("content") or ""
print(json.dumps({"session_id": response.headers["X-Resume-Session-Id"], "text": text}))
"""


def test_compose_example_comes_up_with_podman_compose(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    if not compose_available():
        missing_tool("podman-compose is not installed")
    ensure_image(podman, REDIS, tmp_path)
    compose = yaml.safe_load((ROOT / "examples" / "compose.yaml").read_text())
    services = compose["services"]
    # Only what cannot exist here changes: images from a registry, the user's app, the real
    # upstream; the rest (config, volumes, health checks, Redis wiring) is the example's own.
    services["llm-proxy"]["image"] = image
    services["llm-proxy"]["command"] += ["--upstream", "mock"]
    services["redis"]["image"] = REDIS.tag
    # redis:7 turns protected mode off; Debian's redis-server would refuse other containers.
    services["redis"]["command"] += ["--protected-mode", "no"]
    services["app"].update(image=image, entrypoint=["python", "-c", APP_SCRIPT])
    services["app"]["environment"].update(OPENAI_API_KEY=API_KEY, APP_PROMPT=PROMPT)
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(compose))
    (tmp_path / "proxy.yaml").write_text((ROOT / "examples" / "proxy.yaml").read_text())
    (tmp_path / "proxy.yaml").chmod(0o644)
    project = unique_name("rp-compose").replace("-", "")
    compose_command = ["podman-compose", "--project-name", project, "--file", "compose.yaml"]

    def compose_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose_command, *args],
            cwd=tmp_path,
            env=podman.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    app, proxy, redis = (f"{project}_{service}_1" for service in ("app", "llm-proxy", "redis"))
    try:
        up = compose_run("up", "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        exit_code = podman("wait", app, timeout=120).stdout.strip()
        output = podman("logs", app).stdout
        health = podman("healthcheck", "run", proxy, check=False)
        keys = podman("exec", redis, "redis-cli", "--scan", "--pattern", "rp:*").stdout
        proxy_mounts = podman.inspect(proxy, "{{json .Mounts}}")
    finally:
        # `down --volumes` leaves the network and the app's anonymous /data volume behind.
        volumes = [
            mount["Name"]
            for container in (app, proxy, redis)
            if podman("container", "exists", container, check=False).returncode == 0
            for mount in podman.inspect(container, "{{json .Mounts}}")
            if mount["Type"] == "volume"
        ]
        down = compose_run("down", "--volumes")
        podman("volume", "rm", "--force", *volumes, check=False)
        podman("network", "rm", "--force", f"{project}_default", check=False)
    assert exit_code == "0", output
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer["text"] == "".join(answer_tokens(PROMPT, 6))
    assert f"rp:{{{answer['session_id']}}}:events" in keys.split()
    assert health.returncode == 0, health.stdout + health.stderr
    assert [(m["Name"], m["Destination"]) for m in proxy_mounts if m["Type"] == "volume"] == [
        (f"{project}_llm-proxy-data", "/data")
    ]
    assert down.returncode == 0, down.stdout + down.stderr
