"""The Node client's tests (``node --test clients/node/test/``) against a real ``keyrotor serve``;
values cross Python -> HTTP -> Node and back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from tests.api.processes import ServeProcess
from tests.cli_helpers import keyrotor

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    locked = keyrotor(
        "lock-down",
        "--grant",
        "node-app:node:decrypt,encrypt",
        "--grant",
        "node-app:tenant-1/*:decrypt,encrypt",
        env=env,
    )
    assert locked.returncode == 0, locked.stderr
    server = ServeProcess({**env, "KEYROTOR_API_TOKEN_CACHE_SECONDS": "0"}, tmp_path / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def test_node_client_against_serve(served: ServeProcess, env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.from_env(env)
    async with KeyManager(settings) as km:
        token = (await tokens.create_token(km.sessions, "node-app", by="admin")).token
        denied = (await tokens.create_token(km.sessions, "nobody", by="admin")).token
        ct = await km.encrypt("node", "sk-from-python", context="settings.api_key:7", actor="node-app")
    from_python = tmp_path / "from_python.json"
    from_python.write_text(
        json.dumps(
            [
                {
                    "scope": "node",
                    "context": "settings.api_key:7",
                    "ciphertext": ct,
                    "plaintext": "sk-from-python",
                }
            ]
        )
    )
    out = tmp_path / "from_node.json"
    proc = subprocess.run(
        [str(NODE), "--test", "test/"],
        cwd=ROOT / "clients" / "node",
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            "KEYROTOR_URL": served.url,
            "KEYROTOR_TOKEN": token,
            "KEYROTOR_DENIED_TOKEN": denied,
            "KEYROTOR_FROM_PYTHON": str(from_python),
            "KEYROTOR_NODE_OUT": str(out),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# skipped 0" in proc.stdout and "# fail 0" in proc.stdout
    async with KeyManager(settings) as km:
        for v in json.loads(out.read_text()):
            assert (
                await km.decrypt(v["scope"], v["ciphertext"], context=v["context"], actor="node-app")
                == v["plaintext"]
            )
    log = served.log()
    assert token not in log and denied not in log
    assert "sk-from-python" not in log and "sk-from-node" not in log and "sk-secret" not in log
