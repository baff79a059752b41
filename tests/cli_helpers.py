"""Run the real ``keyrotor`` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "keyrotor"
# The console script's own directory heads its sys.path, so it imports the copy of keyrotor the
# virtualenv has installed unless PYTHONPATH names this checkout.
ROOT = Path(__file__).resolve().parents[1]


def keyrotor(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``keyrotor ARGS`` with exactly ``env`` (plus PATH/HOME) and capture its output."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
    full_env.setdefault("PYTHONPATH", str(ROOT))
    return subprocess.run(
        [str(BIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
