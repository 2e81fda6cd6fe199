from __future__ import annotations

from pathlib import Path

import pytest

from .figures import FIGURES_PATH, RECORDED

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long (`slow`) fault runs are left out unless a `-m` expression asks for them."""
    if config.getoption("markexpr"):
        return
    slow = [
        item
        for item in items
        if item.path.is_relative_to(HERE) and item.get_closest_marker("slow") is not None
    ]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RECORDED:
        return
    terminalreporter.section("fault suite figures")
    for name, figures in RECORDED.items():
        shown = ", ".join(f"{key}={value}" for key, value in figures.items() if key != "startup_s")
        terminalreporter.write_line(f"{name}: {shown}")
        if "startup_s" in figures:
            terminalreporter.write_line(f"  start-up s per round: {figures['startup_s']}")
    terminalreporter.write_line(f"(written to {FIGURES_PATH})")
