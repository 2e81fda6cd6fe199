"""Scale knobs and the figures the fault suite measures (the README's Reliability table).

The load tests (crash loop, slow readers, shutdown) run at two scales: `ci` (the default run,
sized for a 2-core box and a few minutes) and `long` (marked `slow`, run with
`pytest -m slow tests/faults`). The CI sizes can be raised one by one from the environment,
e.g. `FAULT_ROUNDS=100 FAULT_STREAMS=100`; the fuzz tests take `FAULT_FUZZ_EXAMPLES`.

Figures are printed at the end of the run and written, as they are measured, to the JSON file
named by `FAULT_FIGURES` (default: resumable-proxy-faults.json in the temp dir).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def knob(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


@dataclass(frozen=True, slots=True)
class Scale:
    name: str
    rounds: int  # crash loop: kill -9 and restart
    streams: int  # crash loop: streams running at each kill
    slow_readers: int  # slow clients on live sessions
    shutdown_streams: int  # streams running at SIGTERM


CI = Scale(
    "ci",
    rounds=knob("FAULT_ROUNDS", 10),
    streams=knob("FAULT_STREAMS", 20),
    slow_readers=knob("FAULT_SLOW_READERS", 200),
    shutdown_streams=knob("FAULT_SHUTDOWN_STREAMS", 50),
)
LONG = Scale("long", rounds=100, streams=100, slow_readers=1000, shutdown_streams=200)
SCALES = [pytest.param(CI, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
FUZZ_EXAMPLES = knob("FAULT_FUZZ_EXAMPLES", 150)  # hypothesis examples per fuzzed input

FIGURES_PATH = Path(
    os.environ.get("FAULT_FIGURES", Path(tempfile.gettempdir()) / "resumable-proxy-faults.json")
)
RECORDED: dict[str, dict[str, Any]] = {}


def record(name: str, **figures: Any) -> None:
    """Keep one test's figures; rewritten on every call so a long run leaves partial results."""
    RECORDED.setdefault(name, {}).update(figures)
    FIGURES_PATH.write_text(json.dumps(RECORDED, indent=2) + "\n")
