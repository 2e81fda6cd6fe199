"""Node and the real npm client libraries, for the tests of resume.js and of `examples/`.

The packages are the exact versions of `examples/package.json` (and its lock file), installed
once with `npm ci` into a cache dir outside the repository (`~/.cache/resumable-proxy-npm`,
or `$RESUMABLE_PROXY_NPM_CACHE`) and reused while the lock file is unchanged, so a machine
that has them needs no network. `.ci/run` installs them up front with
`python -m tests.client.node`. Without node or npm the tests skip, except under CI, where a
missing tool fails them.

Scripts run from a workspace laid out like the repository (`examples/`, `tests/client/js/`,
`proxy/client/resume.js`) with `node_modules` linked in, so each file runs exactly as written:
Node resolves packages from the real path of the importing file, so a link to the repository's
own files would not find the cache.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..helpers import missing_tool

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MANIFESTS = ("package.json", "package-lock.json")
NODE = shutil.which("node")
NPM = shutil.which("npm")
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 90


def cache_dir() -> Path:
    configured = os.environ.get("RESUMABLE_PROXY_NPM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "resumable-proxy-npm"


def _stamp() -> str:
    digest = hashlib.sha256()
    for name in MANIFESTS:
        digest.update((EXAMPLES / name).read_bytes())
    return digest.hexdigest()


def install() -> Path:
    """`node_modules` with the pinned packages, installed now unless the cache has them."""
    if NODE is None or NPM is None:
        raise RuntimeError("node and npm are needed (Debian: apt-get install nodejs npm)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stamp_file = cache / "installed.sha256"
    with (cache / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time (parallel test runs)
        if stamp_file.exists() and stamp_file.read_text() == _stamp():
            return cache / "node_modules"
        for name in MANIFESTS:
            shutil.copyfile(EXAMPLES / name, cache / name)
        subprocess.run(
            [NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=cache,
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        stamp_file.write_text(_stamp())
    return cache / "node_modules"


def installed_versions() -> dict[str, str]:
    """Package -> exact version, as the tests ran them (for the README table)."""
    manifest = json.loads((EXAMPLES / "package.json").read_text())
    return dict(manifest["dependencies"])


def require_node() -> Path:
    """node_modules for a test; skips (fails under CI) when node or npm is missing."""
    if NODE is None or NPM is None:
        missing_tool("needs node and npm on PATH (Debian: apt-get install nodejs npm)")
    try:
        return install()
    except (subprocess.SubprocessError, OSError) as exc:
        missing_tool(f"npm could not install the client libraries (offline?): {exc}")


@dataclass(frozen=True, slots=True)
class NodeResult:
    returncode: int
    stdout: str
    stderr: str


class Workspace:
    """A copy of the repository's JavaScript files with the cached `node_modules` linked in."""

    def __init__(self, root: Path, node_modules: Path) -> None:
        self.root = root
        for relative in ("examples", "tests/client/js"):
            shutil.copytree(ROOT / relative, root / relative, ignore=_not_node_modules)
        (root / "proxy" / "client").mkdir(parents=True)
        shutil.copyfile(ROOT / "proxy/client/resume.js", root / "proxy/client/resume.js")
        (root / "node_modules").symlink_to(node_modules, target_is_directory=True)

    async def run(self, script: str, *args: str, env: dict[str, str] | None = None) -> NodeResult:
        """Run `script` (a path relative to the workspace) to its end, bounded in time.

        Asynchronous, so a proxy serving in this test's event loop keeps serving meanwhile."""
        assert NODE is not None
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(self.root / script),
            *args,
            cwd=self.root,
            env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return NodeResult(process.returncode, stdout.decode(), stderr.decode())


def _not_node_modules(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "node_modules"]


if __name__ == "__main__":
    print(f"npm client libraries in {install()}", file=sys.stderr)
