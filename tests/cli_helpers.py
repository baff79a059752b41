"""Run the real ``keyrotor`` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "keyrotor"
# The checkout these tests belong to. The console script imports whichever ``keyrotor`` the
# virtualenv was installed from; put this checkout first, so a test of a second working copy
# runs that copy's code and not the installed one.
ROOT = Path(__file__).resolve().parents[1]


def keyrotor(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``keyrotor ARGS`` of this checkout with exactly ``env`` (plus PATH, HOME and a
    PYTHONPATH naming this checkout) and capture its output."""
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.run(
        [str(BIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
