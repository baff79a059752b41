"""A state machine over the census, on the real PostgreSQL: nothing encrypted is ever lost.

Random interleavings of an application's writes (to a registered table, to a table nobody
registered, and with no context at all), its updates and deletes, DEK rotations, retirements,
scheduler scans (expired graces, passed destruction windows) and operators acknowledging a
location with ``columns ignore``. After every step, every stored value decrypts to what the
application wrote -- except values in a location an operator acknowledged (their loss is what
the operator accepted) -- or, put the other way: every retirement or destruction that would
have broken a value was refused.

The library's own code runs in process (rotation, retirement, destruction, the scans and
``columns ignore`` are the functions the worker, scheduler and CLI call); no part is mocked.
The application's KeyManager keeps its caches across steps, so it goes on encrypting under a
version the rotation has already replaced, as a real process does until it is told.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.census import report as census
from keyrotor.errors import PermanentError
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import destruction, retire
from keyrotor.rotation.context import RotationContext
from keyrotor.schedule import scan as schedule
from keyrotor.store import db
from tests.conftest import MASTER_KEY, REDIS_URL, _admin, _url

T = TypeVar("T")
SCOPE = "anthropic"
IDS = st.integers(min_value=1, max_value=6)
TABLES = ("reg_keys", "unreg_keys", "blobs")
# blobs are sealed with no context: their location is "" (shown as "(no context)").
LOCATION = {"reg_keys": "reg_keys.api_key", "unreg_keys": "unreg_keys.api_key", "blobs": ""}
# The soak run (KEYROTOR_SLOW_TESTS=1) tries many more interleavings.
EXAMPLES = int(
    os.environ.get(
        "KEYROTOR_STATE_MACHINE_EXAMPLES", "100" if os.environ.get("KEYROTOR_SLOW_TESTS") else "15"
    )
)


def _context(table: str, row_id: int) -> str:
    return "" if table == "blobs" else f"{table}.api_key:{row_id}"


class CensusMachine(RuleBasedStateMachine):
    """The application, the worker, the scheduler and an operator, in one database."""

    template: str = ""
    outcomes: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.name = f"kr_sm_{uuid.uuid4().hex[:12]}"
        self.model: dict[str, dict[int, str]] = {t: {} for t in TABLES}
        self.acked: set[str] = set()
        self.counter = 0
        self.km: KeyManager | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # --- set-up and tear-down ----------------------------------------------------------------

    @initialize()
    def open(self) -> None:
        self.run(self._open())

    async def _open(self) -> None:
        await _admin(f"CREATE DATABASE {self.name} TEMPLATE {self.template}")
        url = _url(self.name)
        conn = await asyncpg.connect(url)
        try:
            for table in TABLES:
                await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, api_key text)")
        finally:
            await conn.close()
        self.settings = Settings.from_env(
            {
                "DATABASE_URL": url,
                "REDIS_URL": REDIS_URL,
                "ENCRYPTION_KEY": MASTER_KEY,
                "KEYROTOR_LISTEN_KEY_CHANGES": "false",
                "KEYROTOR_LOG_FORMAT": "json",
            }
        )
        self.km = KeyManager(self.settings)
        await self.km.open()
        self.rc = RotationContext(self.km.sessions, self.km.kek, self.settings)
        await columns.register(self.km.sessions, "reg_keys.api_key", pk="id", scope=SCOPE)
        await self.km.encrypt(SCOPE, "first value", context="reg_keys.api_key:0")  # scope gets v1

    def teardown(self) -> None:
        try:
            if self.km is not None:
                self.run(self.km.close())
            self.run(_admin(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
        finally:
            self.loop.close()

    # --- the application -----------------------------------------------------------------------

    @rule(table=st.sampled_from(TABLES), row_id=IDS)
    def write(self, table: str, row_id: int) -> None:
        self.counter += 1
        value = f"sk-ant-api03-{table}-{row_id}-{self.counter:05d}"
        self.run(self._write(table, row_id, value))
        self.model[table][row_id] = value

    async def _write(self, table: str, row_id: int, value: str) -> None:
        assert self.km is not None
        token = await self.km.encrypt(SCOPE, value, context=_context(table, row_id))
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            await conn.execute(
                f"INSERT INTO {table} (id, api_key) VALUES ($1, $2) "
                "ON CONFLICT (id) DO UPDATE SET api_key = excluded.api_key",
                row_id,
                token,
            )
        finally:
            await conn.close()

    @rule(table=st.sampled_from(TABLES), row_id=IDS)
    def delete(self, table: str, row_id: int) -> None:
        self.run(self._execute(f"DELETE FROM {table} WHERE id = $1", row_id))
        self.model[table].pop(row_id, None)

    # --- the worker, the scheduler, the operator ----------------------------------------------

    @rule()
    def rotate(self) -> None:
        self.run(rotation.rotate_dek(self.rc, SCOPE, trigger="schedule"))

    @rule(pick=st.integers(min_value=0, max_value=3))
    def retire_now(self, pick: int) -> None:
        """``keyrotor retire SCOPE V --force-now`` of an old version: done, or refused."""
        versions = self.run(self._versions(("grace", "retired")))
        if versions:
            version = versions[pick % len(versions)]
            # Refused or not, the invariant then checks that the outcome was right.
            self.run(self._outcome("retire", retire.retire_dek(self.rc, SCOPE, version, force_now=True)))

    @rule()
    def scheduler_scan(self) -> None:
        """Every grace and destruction window is over: the scheduler opens and the worker runs."""
        self.run(self._scan())

    async def _scan(self) -> None:
        await self._execute(
            "UPDATE data_keys SET grace_until = now() - interval '1 second' WHERE state = 'grace'"
        )
        await self._execute(
            "UPDATE data_keys SET destroy_after = now() - interval '1 second', "
            "retired_at = retired_at - interval '60 days' "
            "WHERE state = 'retired' AND destroy_after IS NOT NULL"
        )
        cfg = schedule.ScanConfig(backoff_s=0.0, backoff_max_s=0.0)
        now = datetime.now(UTC)
        async for batch in schedule.open_due_retirements(self.rc.sessions, now, cfg):
            for run in batch.opened:
                assert run.from_version is not None
                await self._outcome(
                    "retire", retire.retire_dek(self.rc, SCOPE, run.from_version, run_id=run.id)
                )
        async for batch in schedule.open_due_destructions(self.rc.sessions, datetime.now(UTC), cfg):
            for run in batch.opened:
                assert run.from_version is not None
                result = await self._outcome(
                    "destroy", destruction.destroy_dek(self.rc, SCOPE, run.from_version, run_id=run.id)
                )
                if result is not None and result.outcome == destruction.DESTROYED:
                    CensusMachine.outcomes["destroyed"] += 1

    @rule(table=st.sampled_from(("unreg_keys", "blobs")))
    def ignore(self, table: str) -> None:
        """An operator acknowledges a location (once something was recorded there)."""
        location = LOCATION[table]
        try:
            self.run(self._ignore(location))
        except PermanentError:
            return  # nothing recorded there yet: refused
        self.acked.add(location)

    async def _ignore(self, location: str) -> None:
        async with db.transaction(self.rc.sessions) as session:
            await census.ignore(session, location, reason="state machine: accepted loss", actor="operator")

    # --- the invariant ------------------------------------------------------------------------

    @invariant()
    def every_value_decrypts(self) -> None:
        if self.km is not None:
            self.run(self._check())

    async def _check(self) -> None:
        assert self.km is not None
        self.km.invalidate()  # a cached DEK must not hide a destroyed one
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            for table in TABLES:
                if LOCATION[table] in self.acked:
                    continue
                rows = dict(await conn.fetch(f"SELECT id, api_key FROM {table}"))
                assert set(rows) == set(self.model[table])
                for row_id, token in rows.items():
                    plain = await self.km.decrypt(SCOPE, token, context=_context(table, row_id))
                    assert plain == self.model[table][row_id], (table, row_id)
        finally:
            await conn.close()

    # --- helpers --------------------------------------------------------------------------------

    async def _outcome(self, what: str, coro: Coroutine[Any, Any, T]) -> T | None:
        """Run a retirement or destruction; a refusal is an outcome too (counted, not raised)."""
        try:
            result = await coro
        except PermanentError:
            CensusMachine.outcomes[f"{what} refused"] += 1
            return None
        CensusMachine.outcomes[f"{what} done"] += 1
        return result

    async def _execute(self, sql: str, *args: object) -> None:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def _versions(self, states: tuple[str, ...]) -> list[int]:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch(
                "SELECT d.version FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                "WHERE s.name = $1 AND d.state = ANY($2::text[]) ORDER BY d.version",
                SCOPE,
                list(states),
            )
        finally:
            await conn.close()
        return [int(r[0]) for r in rows]


@pytest.mark.timeout(900)
def test_census_state_machine_never_loses_a_value(template_db: str) -> None:
    CensusMachine.template = template_db
    CensusMachine.outcomes.clear()
    run_state_machine_as_test(
        CensusMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
            derandomize=True,
        ),
    )
    # The run must have exercised both sides: refusals, and keys that were destroyed.
    outcomes = CensusMachine.outcomes
    assert outcomes["retire refused"] > 0 and outcomes["retire done"] > 0, outcomes
    assert outcomes["destroyed"] > 0, outcomes
