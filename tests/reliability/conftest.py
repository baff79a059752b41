"""Fixtures of the reliability suite, and the recorder whose JSON RELIABILITY.md is rendered from.

Every test may add figures with ``record(name, **figures)``; each test's outcome and duration are
recorded by a hook. At the end of the session the whole record is written to
``KEYROTOR_RELIABILITY_JSON`` if set: ``python -m tests.reliability.report`` sets it
(``tests/reliability/results/latest.json``, or ``slow.json`` with ``--slow``) and renders the
file as RELIABILITY.md. A plain test run writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import SLOW, Workers
from tests.rotation_helpers import cleanup_queue, worker_env

# Where the figures go: only when `python -m tests.reliability.report` runs the suite (it sets
# the variable), so a plain test run never rewrites the committed results.
_RESULTS_ENV = os.environ.get("KEYROTOR_RELIABILITY_JSON")
RESULTS = Path(_RESULTS_ENV) if _RESULTS_ENV else None

_figures: dict[str, list[dict[str, Any]]] = {}
_outcomes: dict[str, dict[str, Any]] = {}


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(kind, **figures)``: figures of this test for RELIABILITY.md."""

    def add(kind: str, **figures: Any) -> None:
        _figures.setdefault(request.node.nodeid, []).append({"kind": kind, **figures})

    return add


@pytest.fixture
def rng(request: pytest.FixtureRequest, record: Callable[..., None]) -> random.Random:
    """A seeded RNG; the seed is recorded (KEYROTOR_RELIABILITY_SEED replays a run)."""
    seed = int(os.environ.get("KEYROTOR_RELIABILITY_SEED") or random.SystemRandom().randrange(2**32))
    record("seed", seed=seed)
    return random.Random(seed)


@pytest.fixture
async def wenv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """The env of this test's workers and clients (own queue, channel, short leases)."""
    e = worker_env(env)
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker processes a test starts; all killed at the end."""
    w = Workers(tmp_path)
    yield w
    w.close_all()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.nodeid] = {"outcome": report.outcome, "duration_s": round(report.duration, 2)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ours = {k: v for k, v in _outcomes.items() if k.startswith("tests/reliability/")}
    if not ours:
        return
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    doc = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "slow": SLOW,
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "tests": {
            nodeid: {**outcome, "figures": _figures.get(nodeid, [])}
            for nodeid, outcome in sorted(ours.items())
        },
    }
    if RESULTS is None:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
