"""Layers never import upward: storage knows nothing of HTTP or sessions, metrics nothing of
the project; and the store's own errors map to the contract's HTTP errors in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy.errors import (
    ERROR_TYPE,
    ProxyError,
    SessionConflict,
    SessionNotFound,
    StorageUnavailable,
    as_proxy_error,
)
from proxy.storage.base import SessionExists, SessionMissing, StorageError

PROXY = Path(__file__).resolve().parent.parent / "proxy"


def project_imports(path: Path) -> set[str]:
    """Every `proxy.*` module a file imports, relative imports resolved."""
    package = ".".join(path.relative_to(PROXY.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("proxy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("proxy"):
                found.add(module)
    return found


def test_storage_imports_only_storage_and_the_pure_layers() -> None:
    allowed = ("proxy.storage", "proxy.config", "proxy.trace")
    paths = sorted((PROXY / "storage").rglob("*.py"))
    assert PROXY / "storage" / "redis" / "store.py" in paths  # subpackages are walked too
    for path in paths:
        upward = {m for m in project_imports(path) if not m.startswith(allowed)}
        assert not upward, f"{path.name} imports {upward}"


def test_metrics_imports_nothing_of_the_project() -> None:
    assert project_imports(PROXY / "metrics.py") == set()


@pytest.mark.parametrize(
    ("raised", "kind", "status", "code"),
    [
        (SessionMissing("session s not found"), SessionNotFound, 404, "session_not_found"),
        (SessionExists("session s already exists"), SessionConflict, 409, "session_conflict"),
        (StorageError("disk full"), StorageUnavailable, 503, "storage_unavailable"),
        (SessionNotFound("no such session"), SessionNotFound, 404, "session_not_found"),
    ],
)
def test_store_errors_map_to_the_contract_in_one_place(
    raised: Exception, kind: type[ProxyError], status: int, code: str
) -> None:
    mapped = as_proxy_error(raised)  # type: ignore[arg-type]
    assert isinstance(mapped, kind) and mapped.status == status
    assert mapped.body() == {"error": {"message": mapped.message, "type": ERROR_TYPE, "code": code}}
    if isinstance(raised, StorageError):
        assert "disk full" not in mapped.message  # the cause is logged, not told to clients
