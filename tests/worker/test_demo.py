"""``keyrotor demo`` end to end in a subprocess, twice (it must be idempotent), on a database
that does not exist yet and a queue, channel and leader key of its own. The first run has a
terminal (a pty), so its live progress bar is checked too."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from keyrotor.worker.cli.demo import _Process
from tests.conftest import MASTER_KEY, PG_ADMIN, _admin
from tests.rotation_helpers import BIN, WORKER_REDIS_URL, cleanup_queue, keyrotor, process_env


@pytest.fixture
async def demo_env() -> AsyncIterator[dict[str, str]]:
    name = f"kr_demo_{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex[:10]
    queue = f"krtest:{tag}"
    yield {
        "DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + name,
        "REDIS_URL": WORKER_REDIS_URL,
        "ENCRYPTION_KEY": MASTER_KEY,
        "KEYROTOR_QUEUE_NAME": queue,
        "KEYROTOR_NOTIFY_CHANNEL": f"{queue}:keys",
        "KEYROTOR_SCHEDULER_LEADER_KEY": f"{queue}:scheduler:leader",
        "KEYROTOR_WORKER_POLL_DELAY_SECONDS": "0.05",
        "COLUMNS": "200",
    }
    await cleanup_queue(queue)
    await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _in_a_terminal(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run ``keyrotor ARGS`` with a pseudo-terminal as stdout and stderr (rich then draws its
    live progress bar); returns the exit code and everything written, escape codes removed."""
    full = process_env(env)  # PYTHONPATH too: the demo under test, not the installed one
    main, sub = pty.openpty()
    proc = subprocess.Popen([str(BIN), *args], stdout=sub, stderr=sub, env=full)
    os.close(sub)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    code = proc.wait(10)
    text = b"".join(chunks).decode(errors="replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")


def test_demo_runs_the_whole_system_and_is_idempotent(demo_env: dict[str, str]) -> None:
    started = time.monotonic()
    # First run in a terminal, as a person runs it: the progress bar is drawn live.
    code, out = _in_a_terminal(["demo"], demo_env, 60)
    assert code == 0, out[-4000:]
    assert "created the database" in out
    for provider in ("openai", "anthropic", "google"):
        assert f"stored and read back {provider}/demo" in out
        assert f"and 5000 per-tenant {provider} keys" in out
        assert f"{provider} v1 -> v2: completed, 5001 row(s)" in out
        # Live: the bar was redrawn part-way through (batches of 500 rows), not only at the end.
        shown = {int(n) for n in re.findall(rf"rotating {provider}\s.*?(\d+)/5001", out)}
        assert 5001 in shown and [n for n in shown if 0 < n < 5001], sorted(shown)
    assert "both reported in" in out
    assert "v1: 0, v2: 5001" in out  # status table: rows per version
    assert "grace until" in out and "next rotation" in out
    assert "replicas: not configured" in out
    assert "keyrotor_rotations_completed_total" in out  # scraped from the worker's /metrics
    assert 'keyrotor_rows_reencrypted_total{scope="openai"} 5001.0' in out
    assert "audit log (last 10 events; " in out and " rotate " in out
    assert "stopped: scheduler exit 0, worker exit 0" in out

    second = keyrotor("demo", env=demo_env, timeout=60)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    assert "created the database" not in out2
    for provider in ("openai", "anthropic", "google"):
        assert f"{provider} v2 -> v3: completed, 5001 row(s)" in out2
    assert "stopped: scheduler exit 0, worker exit 0" in out2
    assert MASTER_KEY not in out + out2
    for line in (out + out2).splitlines():  # the demo keys are shown masked only
        assert not re.search(
            r"sk-ant-api03-[A-Za-z0-9_-]{20,}|sk-proj-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{30,}", line
        )
    assert time.monotonic() - started < 90


def test_a_process_killed_after_sigterm_shows_the_end_of_its_log_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A CI run whose demo had to kill a process must say what that process was doing.
    leaked = "sk-ant-api03-" + "Zq8" * 12
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "for i in range(60): print(f'step {i}')\n"
        f"print('stuck in reencrypt, key {leaked}, master {MASTER_KEY}')\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "ENCRYPTION_KEY": MASTER_KEY}
    proc = _Process("worker", [], env, tmp_path, command=[sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while "stuck in" not in proc.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.stop(timeout_s=0.5) == -signal.SIGKILL
    err = capsys.readouterr().err
    assert "the worker did not stop within 0.5s of SIGTERM and was killed" in err
    assert "stuck in reencrypt" in err and "  step 59\n" in err and "  step 0\n" not in err
    assert leaked not in err and MASTER_KEY not in err and "[REDACTED]" in err
