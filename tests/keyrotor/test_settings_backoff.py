"""A backoff's cap below its base is refused, naming both variables (it used to be taken as the
cap, silently: every wait was then the cap, and the base meant nothing)."""

from __future__ import annotations

import os

import pytest

from keyrotor import Settings
from keyrotor.errors import ConfigurationError
from keyrotor.settings import SchedulerSettings, WorkerSettings
from tests.rotation_helpers import keyrotor

PAIRS = [
    ("KEYROTOR_RETRY_BACKOFF_SECONDS", "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS", WorkerSettings),
    ("KEYROTOR_SCHEDULE_BACKOFF_SECONDS", "KEYROTOR_SCHEDULE_BACKOFF_MAX_SECONDS", SchedulerSettings),
]


@pytest.mark.parametrize(("base", "cap", "part"), PAIRS)
def test_a_cap_below_its_base_is_a_configuration_error_naming_both(
    base: str, cap: str, part: type[WorkerSettings | SchedulerSettings]
) -> None:
    for settings in (Settings, part):
        with pytest.raises(ConfigurationError) as refused:
            settings.from_env({base: "120", cap: "30"})
        message = str(refused.value)
        assert base in message and cap in message, message
        assert "\n" not in message


@pytest.mark.parametrize(("base", "cap", "part"), PAIRS)
def test_a_cap_equal_to_or_above_its_base_is_fine(
    base: str, cap: str, part: type[WorkerSettings | SchedulerSettings]
) -> None:
    part.from_env({base: "30", cap: "30"})
    part.from_env({base: "1.5", cap: "2"})
    Settings.from_env({base: "5"} if "RETRY" in base else {base: "60"})  # the other default cap


def test_the_worker_refuses_it_in_one_line_exit_2() -> None:
    env = {"KEYROTOR_RETRY_BACKOFF_SECONDS": "90", "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS": "60"}
    # The keyrotor script imports the package it was installed from: a checkout's PYTHONPATH
    # (set to test a working copy) makes it run the code under test.
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = keyrotor("worker", "--burst", env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyrotor: error: invalid configuration: "), out.stderr
    assert "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS" in lines[0] and "Traceback" not in out.stderr
