"""``keyrotor replicas check|status|promote``, ``keyrotor status`` and the health check, run as
the real console script."""

from __future__ import annotations

import asyncio
import json
import os

from keyrotor import KeyManager, Settings
from keyrotor.worker.cli.health import replica_health
from tests.cli_helpers import BIN, ROOT
from tests.conftest import _url
from tests.replication.conftest import PRIMARY, REGION_KEYS, settle, sql, unreachable
from tests.replication.proxy import PgProxy


async def keyrotor(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the console script without blocking the loop (the test's proxies run on it)."""
    home = os.environ.get("HOME", "/root")
    full = {"PATH": os.environ.get("PATH", ""), "HOME": home, "PYTHONPATH": str(ROOT), **env}  # see BIN
    proc = await asyncio.create_subprocess_exec(
        str(BIN), *args, env=full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_replicas_cli(rkm: KeyManager, renv: dict[str, str], region_urls: dict[str, str]) -> None:
    await rkm.encrypt("anthropic", "sk-ant-cli-value", context="c")
    await settle(rkm)
    await sql(region_urls["eu-west-1"], "DELETE FROM replica_keys")

    # Configuration errors are one line, exit 2, and never echo a URL.
    code, out, err = await keyrotor(
        "replicas", "check", env={**renv, "KEYROTOR_REGIONS": "eu=mysql://u:pw2@h/x"}
    )
    assert code == 2 and err.count("\n") == 1 and "pw2" not in err and err.startswith("keyrotor: error:")

    code, out, err = await keyrotor("replicas", "check", "--json", env=renv)
    assert code == 1, err
    doc = json.loads(out)
    assert doc["primary"] == "us-east-1"
    eu, ap = doc["regions"]
    assert (eu["region"], eu["status"], eu["kek_version"]) == ("eu-west-1", "missing", None)
    assert (ap["region"], ap["status"], ap["kek_version"]) == ("ap-south-1", "in_sync", 1)
    assert ap["last_ok_at"] and "detail" in ap

    code, out, err = await keyrotor("replicas", "check", "--repair", "--json", env=renv)
    assert code == 0, err
    assert [(r["status"], r["found"]) for r in json.loads(out)["regions"]] == [
        ("in_sync", "missing"),
        ("in_sync", "in_sync"),
    ]

    code, out, err = await keyrotor("status", "--json", env=renv)
    assert code == 0, err
    replicas = json.loads(out)["replicas"]
    assert [(r["region"], r["status"]) for r in replicas["regions"]] == [
        ("eu-west-1", "in_sync"),
        ("ap-south-1", "in_sync"),
    ]
    health = await replica_health(Settings.from_env(renv))
    assert health["status"] == "ok" and "eu-west-1 in_sync" in health["detail"]

    code, out, err = await keyrotor("replicas", "promote", "ap-south-1", "--json", "--yes", env=renv)
    assert code == 0, err
    assert json.loads(out)["deks"] == 1
    await rkm.replication.check(repair=True)  # type: ignore[union-attr]
    health = await replica_health(Settings.from_env(renv))
    assert health["status"] == "fail" and "ap-south-1: drifted" in health["error"]


async def test_promote_from_the_cli_while_the_primary_is_down(
    rkm: KeyManager,
    renv: dict[str, str],
    env: dict[str, str],
    proxies: dict[str, PgProxy],
    region_databases: dict[str, str],
) -> None:
    """The outage promotion is for: the primary's database is gone. The command must neither
    need the primary (its KEK provider, its install salt) nor leave the promoted store an audit
    key wrapped under the old primary's KEK, which the promoted deployment does not have."""
    token = await rkm.encrypt("anthropic", "sk-ant-promoted-by-cli", context="c:1")
    await settle(rkm)
    async with unreachable(proxies[PRIMARY]):
        code, out, err = await keyrotor("replicas", "promote", "ap-south-1", "--json", "--yes", env=renv)
    assert code == 0, err
    assert json.loads(out)["primary_reachable"] is False
    promoted = {
        **env,
        "DATABASE_URL": _url(region_databases["ap-south-1"]),
        "ENCRYPTION_KEY": REGION_KEYS["ap-south-1"],
        "KEYROTOR_PRIMARY_REGION": "ap-south-1",
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
    }
    async with KeyManager(Settings.from_env(promoted), environ=promoted) as km2:
        assert await km2.decrypt("anthropic", token, context="c:1") == "sk-ant-promoted-by-cli"
    code, out, err = await keyrotor("audit", "verify", "--json", env=promoted)
    assert code == 0, err
