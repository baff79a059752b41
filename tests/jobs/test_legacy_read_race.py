"""An application read racing the legacy migration: the value it read was migrated before its
decrypt arrived. Real Postgres; legacy values from tests/legacy_helpers.py."""

from __future__ import annotations

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.errors import AccessDenied
from keyrotor.legacy import migration as legacy_migration
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import fetch

CREATE = "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)"


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


async def test_a_legacy_value_read_just_before_its_migration_still_opens(wenv: dict[str, str]) -> None:
    """docs/node.md's backend reads ``row.api_key`` then asks keyrotor to decrypt it; the migration
    may replace the row's value in between. The legacy value it holds was that row's value and
    opens to what the row's kr1 successor opens to: refusing it (403, audited ``unauthorized``,
    counted towards the actor's failure budget) broke every read that raced a batch. A stale value
    the row no longer stands for, or another row's value, is still refused."""
    s = settings_of(wenv)
    rows = [r for r in legacy_rows()[:6] if r[0] == "openai"]
    await fetch(s.database_url, CREATE)
    got = await fetch(
        s.database_url,
        "INSERT INTO settings (provider, api_key) SELECT 'openai', * FROM unnest($1::text[]) RETURNING id",
        [r[2] for r in rows],
    )
    ids = [g["id"] for g in got]
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        # What the application read, before the migration reached the rows.
        read = {
            i: (await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i))[0][0]
            for i in ids
        }
        report = await legacy_migration.migrate_legacy(km, workers=1)
        assert report.migrated == len(rows)
        first, second, third = ids[0], ids[1], ids[2]
        # The value read before the migration opens, through its row, in its scope.
        ctx = f"settings.api_key:{first}"
        assert await km.decrypt("openai", read[first], context=ctx, actor="app") == rows[0][1]
        # Another row's legacy value presented for this row: refused, never its plaintext.
        with pytest.raises(AccessDenied) as refused:
            await km.decrypt("openai", read[second], context=ctx, actor="app")
        assert rows[1][1] not in str(refused.value)
        # A row the application then rewrote: the value it replaced no longer opens there.
        token = await km.encrypt(
            "openai", "sk-proj-rewritten-0000000000000000", context=f"settings.api_key:{third}"
        )
        await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", third, token)
        with pytest.raises(AccessDenied):
            await km.decrypt("openai", read[third], context=f"settings.api_key:{third}", actor="app")
        # Another scope never opens it.
        with pytest.raises(AccessDenied):
            await km.decrypt("anthropic", read[first], context=ctx, actor="app")
