"""Real containers for tests: podman, a Debian base made from Debian packages, the built image.

No image registry is reachable from CI, so nothing is pulled. The base image is made the way
Debian makes its own (`mmdebstrap` from the Debian archive, then `podman import`), slimmed like
debian:bookworm-slim (no docs, man pages or locales) so its size compares with
python:3.11-slim, and kept in podman's store under a tag that names its recipe: later runs on
the same machine reuse it. The dependencies are built into wheels on the host, with the
host's pip configuration (an intercepting TLS proxy breaks pip inside a build), and mounted
into a build that has no network at all.

Podman is configured through a `containers.conf` of our own (`CONTAINERS_CONF`): the runc
runtime, and ulimits the runtime is allowed to set here (podman's rootful defaults ask for
more open files than the hard limit, and conmon caps processes at the kernel's pid_max).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .helpers import ROOT, free_port

SUITE = "bookworm"
_SLIM_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
# What debian:bookworm sets and a bare `podman import` does not.
_DEBIAN_PATH = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class DebianImage:
    """An image made from Debian packages; its tag names its recipe, so a changed recipe is
    a new image and an unchanged one is made once per machine."""

    name: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]

    @property
    def mmdebstrap(self) -> tuple[str, ...]:
        return (
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(self.packages),
            # merged /usr without the usrmerge package, which would pull perl into the image
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in _SLIM_EXCLUDES),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            SUITE,
        )

    @property
    def tag(self) -> str:
        recipe = json.dumps([self.mmdebstrap, self.changes]).encode()
        return f"localhost/{self.name}:{SUITE}-{hashlib.sha256(recipe).hexdigest()[:12]}"


# The Dockerfile's BASE: Debian's Python 3.11, the same family as python:3.11-slim.
BASE = DebianImage(
    "resumable-proxy-base",
    ("python3", "python3-venv", "ca-certificates"),
    (_DEBIAN_PATH, "ENV LANG=C.UTF-8", 'CMD ["python3"]'),
)
# Stands in for redis:7 in the compose example (Debian's redis-server, /data as its dir).
REDIS = DebianImage(
    "resumable-proxy-redis",
    ("redis-server",),
    (_DEBIAN_PATH, "WORKDIR /data", "EXPOSE 6379", 'CMD ["redis-server"]'),
)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resumable-proxy"
# The image's own stop timeout in the tests: above server.shutdown_grace (10s), so a stop
# that ends in SIGKILL (exit 137) means the proxy did not drain and exit by itself.
STOP_TIMEOUT_S = 30


def tools_available() -> bool:
    """Whether podman and mmdebstrap are here and podman runs. Under CI (`CI` set, where
    `.ci/run` installs them) a missing one is an error, so these tests never pass by skipping."""
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if not missing:
        info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return True
        missing = [f"a working podman (podman info: {info.stderr.strip()[-300:]})"]
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must install {', '.join(missing)}")
    return False


def compose_available() -> bool:
    """Whether podman-compose (a Debian package) is here; under CI its absence is an error."""
    if shutil.which("podman-compose") is not None:
        return True
    if os.environ.get("CI"):
        raise RuntimeError("CI must install podman-compose")
    return False


class PodmanError(AssertionError):
    """A podman command failed; the message carries its stderr, which names the cause."""


@dataclass
class Podman:
    """podman with our containers.conf; every call is bounded in time."""

    conf_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        conf = self.conf_dir / "containers.conf"
        conf.write_text(containers_conf())
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["podman", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def inspect(self, name: str, template: str = "{{json .}}") -> Any:
        """One object's inspect data (a container, image or volume)."""
        output = self("inspect", "--format", template, name).stdout
        return json.loads(output) if template.startswith("{{json") else output.strip()


def containers_conf() -> str:
    """runc, and ulimits no higher than what the runtime may set on this machine."""
    nofile = _cap(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = _cap(resource.getrlimit(resource.RLIMIT_NPROC)[1], pid_max)
    return (
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )


def _cap(hard: int, ceiling: int) -> int:
    return ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """One test run at a time makes the shared base; the others wait for it and reuse it."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_image(podman: Podman, image: DebianImage, workdir: Path) -> bool:
    """Make `image` unless podman's store already has it. True if it was made now."""
    with _machine_lock(image.name):
        if podman("image", "exists", image.tag, check=False).returncode == 0:
            return False
        rootfs = workdir / f"{image.name}.tar"
        made = subprocess.run(
            [*image.mmdebstrap, str(rootfs)], capture_output=True, text=True, timeout=900
        )
        if made.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed:\n{made.stderr[-3000:]}")
        changes = [arg for change in image.changes for arg in ("--change", change)]
        podman("import", *changes, str(rootfs), image.tag, timeout=300)
        rootfs.unlink()
        return True


def requirements() -> list[str]:
    """Everything pip needs to build and install `.[fast,redis]`, as pyproject.toml says."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    return [
        *project["build-system"]["requires"],
        *project["project"]["dependencies"],
        *extras["fast"],
        *extras["redis"],
    ]


def wheel_interpreter(podman: Podman, image: str) -> str:
    """A host Python of the image's exact version: pip evaluates markers such as redis's
    `async-timeout; python_full_version < "3.11.3"` for the interpreter it runs under, so
    wheels resolved under another one can miss what the image needs."""
    wanted = podman(
        "run", "--rm", "--network", "none", image,
        "python3", "-c", "import platform; print(platform.python_version())",
    ).stdout.strip()  # fmt: skip
    found: dict[str, str] = {}
    for candidate in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        probe = subprocess.run(
            [candidate, "-c", "import platform, pip; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        found[candidate] = probe.stdout.strip() or probe.stderr.strip()[-200:]
        if probe.returncode == 0 and found[candidate] == wanted:
            return candidate
    raise RuntimeError(f"no host Python {wanted} with pip to build the image's wheels: {found}")


def build_wheels(python: str, wheels: Path) -> None:
    """Wheels of every requirement, built with the host's pip configuration."""
    wheels.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), *requirements()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{built.stderr[-3000:]}")


def build_image(podman: Podman, tag: str, base: str, wheels: Path) -> None:
    """The repository's Dockerfile on `base`, from the mounted wheels, with no network.
    `--format docker` because the OCI image format has no HEALTHCHECK."""
    podman(
        "build",
        "--format", "docker",
        "--network", "none",
        "--volume", f"{wheels}:/wheels:ro",
        "--build-arg", f"BASE={base}",
        "--build-arg", "WHEELS=/wheels",
        "--tag", tag,
        str(ROOT),
        timeout=600,
    )  # fmt: skip


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Container:
    """One `podman run -d` of the image, published on 127.0.0.1 only."""

    podman: Podman
    image: str
    volume: str
    args: Sequence[str] = ()
    run_options: Sequence[str] = ()
    container_port: int = 8080
    name: str = field(default_factory=lambda: unique_name("rp-test"))
    host_port: int = field(default_factory=free_port)
    seconds_to_healthy: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"

    def run(self) -> Container:
        """Start it and wait until `podman healthcheck run` says healthy."""
        started = time.monotonic()
        self.podman(
            "run", "--detach",
            "--name", self.name,
            "--stop-timeout", str(STOP_TIMEOUT_S),
            "--publish", f"127.0.0.1:{self.host_port}:{self.container_port}",
            "--volume", f"{self.volume}:/data",
            *self.run_options,
            self.image,
            *self.args,
        )  # fmt: skip
        self.wait_healthy(started)
        return self

    def wait_healthy(self, started: float | None = None, attempts: int = 200) -> None:
        started = time.monotonic() if started is None else started
        for _ in range(attempts):
            if self.podman("healthcheck", "run", self.name, check=False).returncode == 0:
                self.seconds_to_healthy = time.monotonic() - started
                return
            if self.podman.inspect(self.name, "{{.State.Running}}") != "true":
                break
            time.sleep(0.1)
        logs = self.podman("logs", self.name, check=False)
        raise PodmanError(f"{self.name} never became healthy:\n{logs.stdout}{logs.stderr}")

    def exec(self, *command: str) -> str:
        return self.podman("exec", self.name, *command).stdout

    def remove(self) -> None:
        self.podman("rm", "--force", "--time", "0", self.name, check=False)
