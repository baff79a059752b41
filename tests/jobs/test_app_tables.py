"""Application tables as real users have them, each through a rotation fanned out into ranges,
a retirement and the census, every value checked to decrypt with its context after each step."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.errors import ConfigurationError
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.reencrypt import RowFailed, UpdateNotApplied
from keyrotor.rotation.retire import KeyStillInUse
from tests.destruction_helpers import key_row
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch, keyrotor

SCOPE = "openai"
ROWS = 30


@dataclass(frozen=True)
class App:
    """One application table: its DDL, how SQL names it, and how ``columns register`` names it."""

    ddl: str
    table: str  # as SQL names it (quoted where it must be)
    spec: str  # TABLE.COLUMN as registered
    value: str = "api_key"  # the value column as SQL names it
    pk: str = "id"  # the key column as registered
    pk_sql: str = "id"  # ... and as SQL names it


def _settings(wenv: dict[str, str]) -> Settings:
    return settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="5",
        KEYROTOR_REENCRYPT_RANGE_ROWS="8",
        KEYROTOR_REENCRYPT_BATCH_ROWS="3",
        KEYROTOR_LISTEN_KEY_CHANGES="false",
    )


async def _fill(s: Settings, app: App, context_table: str) -> dict[int, str | None]:
    """ROWS rows with ids 1..ROWS: sealed values, a NULL, an empty string; returns id -> plaintext."""
    expected: dict[int, str | None] = {}
    values: list[str | None] = []
    async with KeyManager(s) as km:
        for i in range(1, ROWS + 1):
            if i == 4:
                plain, value = None, None
            elif i == 5:
                plain, value = "", ""
            elif i == 7:  # the same key in two rows: two values, each bound to its row
                plain = expected[6]
                value = await km.encrypt(SCOPE, plain or "", context=f"{context_table}:{i}")
            else:
                plain = f"sk-proj-{i:04d}-{secrets.token_urlsafe(24)}"
                value = await km.encrypt(SCOPE, plain, context=f"{context_table}:{i}")
            expected[i] = plain
            values.append(value)
    await fetch(
        s.database_url,
        f"INSERT INTO {app.table} ({app.pk_sql}, {app.value}) SELECT * FROM unnest($1::int[], $2::text[])",
        list(expected),
        values,
    )
    return expected


async def _check(s: Settings, app: App, context_table: str, expected: dict[int, str | None]) -> set[str]:
    """Every value decrypts to what was stored; returns the versions seen."""
    rows = await fetch(s.database_url, f"SELECT {app.pk_sql}::int, {app.value}::text FROM {app.table}")
    assert {r[0] for r in rows} == set(expected)
    versions = set()
    async with KeyManager(s) as km:
        for key, value in rows:
            if expected[key] in (None, ""):
                assert value == expected[key], key
                continue
            versions.add(value.split(":")[1])
            assert await km.decrypt(SCOPE, value, context=f"{context_table}:{key}") == expected[key], key
    return versions


async def _cycle(wenv: dict[str, str], app: App, context_table: str | None = None) -> None:
    s = _settings(wenv)
    ctx = context_table or app.spec
    for statement in app.ddl.split(";\n"):
        if statement.strip():
            await fetch(s.database_url, statement)
    expected = await _fill(s, app, ctx)
    reg = keyrotor("columns", "register", app.spec, "--pk", app.pk, "--scope", SCOPE, env=wenv)
    assert reg.returncode == 0, reg.stderr
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, SCOPE)
        assert len(progress.ranges) >= 3
        for r in progress.ranges:
            await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        assert await _check(s, app, ctx, expected) == {"2"}
        await retire.retire_dek(rc, SCOPE, 1, force_now=True)
        assert await _check(s, app, ctx, expected) == {"2"}
        async with km.sessions() as session:
            (census,) = [c for c in await columns.census(session) if c["column"] == app.spec]
        assert census["rows_by_version"] == {"2": ROWS - 2} and census["legacy"] == 0


APPS = {
    "other_schema": App(
        "CREATE SCHEMA billing;\nCREATE TABLE billing.settings (id int PRIMARY KEY, api_key text)",
        "billing.settings",
        "billing.settings.api_key",
    ),
    "mixed_case": App(
        'CREATE TABLE "UserSettings" (id int PRIMARY KEY, "apiKey" text)',
        '"UserSettings"',
        "UserSettings.apiKey",
        value='"apiKey"',
    ),
    "reserved": App(
        'CREATE TABLE "order" ("user" int PRIMARY KEY, "key" text)',
        '"order"',
        "order.key",
        value='"key"',
        pk="user",
        pk_sql='"user"',
    ),
    "before_trigger": App(
        "CREATE TABLE trig (id int PRIMARY KEY, api_key text, updated_at timestamptz, n int DEFAULT 0);\n"
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN NEW.updated_at := now(); NEW.n := OLD.n + 1; RETURN NEW; END$$;\n"
        "CREATE TRIGGER t BEFORE UPDATE ON trig FOR EACH ROW EXECUTE FUNCTION touch()",
        "trig",
        "trig.api_key",
    ),
    "audit_trigger": App(
        "CREATE TABLE aud (id int PRIMARY KEY, api_key text);\n"
        "CREATE TABLE aud_log (id int, at timestamptz DEFAULT now());\n"
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO aud_log (id) VALUES (NEW.id); RETURN NULL; END$$;\n"
        "CREATE TRIGGER t AFTER UPDATE ON aud FOR EACH ROW EXECUTE FUNCTION audit()",
        "aud",
        "aud.api_key",
    ),
    "partitioned": App(
        "CREATE TABLE part (id int PRIMARY KEY, api_key text) PARTITION BY RANGE (id);\n"
        "CREATE TABLE part_a PARTITION OF part FOR VALUES FROM (MINVALUE) TO (12);\n"
        "CREATE TABLE part_b PARTITION OF part FOR VALUES FROM (12) TO (MAXVALUE)",
        "part",
        "part.api_key",
    ),
    "generated": App(
        "CREATE TABLE gen (id int PRIMARY KEY, api_key text, "
        "hint text GENERATED ALWAYS AS (left(api_key, 6)) STORED)",
        "gen",
        "gen.api_key",
    ),
    "unlogged": App("CREATE UNLOGGED TABLE unl (id int PRIMARY KEY, api_key text)", "unl", "unl.api_key"),
    "varchar_value": App("CREATE TABLE vv (id int PRIMARY KEY, api_key varchar)", "vv", "vv.api_key"),
}


@pytest.mark.parametrize("kind", list(APPS))
async def test_an_application_table_goes_through_rotation_retirement_and_census(
    wenv: dict[str, str], kind: str
) -> None:
    await _cycle(wenv, APPS[kind])


REFUSED = {
    "varchar_too_short": (
        "CREATE TABLE vs (id int PRIMARY KEY, api_key varchar(255))",
        "vs.api_key",
        "id",
        "is character varying(255)",
    ),
    "citext_value": (
        "CREATE EXTENSION IF NOT EXISTS citext;\nCREATE TABLE cv (id int PRIMARY KEY, api_key citext)",
        "cv.api_key",
        "id",
        "is citext, not text",
    ),
    "citext_key": (
        "CREATE EXTENSION IF NOT EXISTS citext;\nCREATE TABLE ck (id citext PRIMARY KEY, api_key text)",
        "ck.api_key",
        "id",
        "is citext; it must be",
    ),
    "view": (
        "CREATE TABLE base (id int PRIMARY KEY, api_key text);\nCREATE VIEW v_base AS SELECT * FROM base",
        "v_base.api_key",
        "id",
        "v_base is a view, not a table",
    ),
    "materialized_view": (
        "CREATE TABLE mbase (id int PRIMARY KEY, api_key text);\n"
        "CREATE MATERIALIZED VIEW m_base AS SELECT * FROM mbase;\n"
        "CREATE UNIQUE INDEX ON m_base (id)",
        "m_base.api_key",
        "id",
        "m_base is a materialized view, not a table",
    ),
    "no_unique_key": (
        "CREATE TABLE nokey (id int, api_key text)",
        "nokey.api_key",
        "id",
        "is not unique",
    ),
    "nullable_unique_key": (
        "CREATE TABLE nullkey (id int UNIQUE, api_key text)",
        "nullkey.api_key",
        "id",
        "nullkey.id may be NULL",
    ),
    "generated_value": (
        "CREATE TABLE genv (id int PRIMARY KEY, raw text, api_key text GENERATED ALWAYS AS (raw) STORED)",
        "genv.api_key",
        "id",
        "genv.api_key is a generated column",
    ),
    "name_needing_quotes": (
        'CREATE TABLE dash (id int PRIMARY KEY, "api-key" text)',
        "dash.api-key",
        "id",
        "is not a plain SQL identifier",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED))
async def test_a_table_keyrotor_cannot_rotate_safely_is_refused_at_registration(
    wenv: dict[str, str], kind: str
) -> None:
    ddl, spec, pk, reason = REFUSED[kind]
    s = _settings(wenv)
    for statement in ddl.split(";\n"):
        await fetch(s.database_url, statement)
    out = keyrotor("columns", "register", spec, "--pk", pk, "--scope", SCOPE, env=wenv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert reason in out.stderr, out.stderr
    assert await fetch(s.database_url, "SELECT * FROM managed_columns") == []


async def test_row_level_security_that_hides_rows_is_refused_before_a_rotation_or_retirement(
    wenv: dict[str, str],
) -> None:
    """A policy that shows keyrotor's role only some rows would let a rotation skip the others
    and the proof count none of them: the retired version's DEK would be the only key to
    values it never saw. Registration refuses the table for that role, and a rotation or a
    retirement by a role the policy restricts (the CLI's role may bypass it, the worker's not)
    refuses before touching a row."""
    s = _settings(wenv)
    role = f"kr_rls_{secrets.token_hex(4)}"
    app = App(
        "CREATE TABLE tenant_keys (id int PRIMARY KEY, tenant text DEFAULT 'a', api_key text);\n"
        "ALTER TABLE tenant_keys ENABLE ROW LEVEL SECURITY;\n"
        "CREATE POLICY own_tenant ON tenant_keys USING (tenant = current_setting('app.tenant', true))",
        "tenant_keys",
        "tenant_keys.api_key",
    )
    for statement in app.ddl.split(";\n"):
        await fetch(s.database_url, statement)
    expected = await _fill(s, app, app.spec)
    for statement in (
        f"CREATE ROLE {role} LOGIN",
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
    ):
        await fetch(s.database_url, statement)
    as_role = s.database_url.replace("postgres@", f"{role}@", 1)
    try:
        out = keyrotor(
            "columns", "register", app.spec, "--pk", "id", "--scope", SCOPE,
            env={**wenv, "DATABASE_URL": as_role},
        )  # fmt: skip
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "row-level security on tenant_keys hides rows" in out.stderr, out.stderr
        # The superuser bypasses the policy, so it registers; the worker's role does not.
        out = keyrotor("columns", "register", app.spec, "--pk", "id", "--scope", SCOPE, env=wenv)
        assert out.returncode == 0, out.stderr
        restricted = s.model_copy(update={"database_url": as_role})
        async with KeyManager(restricted) as km:
            rc = RotationContext(km.sessions, km.kek, restricted)
            with pytest.raises(ConfigurationError, match="row-level security on tenant_keys hides rows"):
                await rotation.rotate_dek(rc, SCOPE)
        stale = (await fetch(s.database_url, "SELECT api_key FROM tenant_keys WHERE id = 6"))[0][0]
        async with KeyManager(s) as km:  # rotated by a role that sees every row
            rc = RotationContext(km.sessions, km.kek, s)
            for r in (await rotation.rotate_dek(rc, SCOPE)).ranges:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        # A process with a stale cache writes a v1 value back: only a role that sees the row
        # can re-encrypt it, or count it.
        await fetch(s.database_url, "UPDATE tenant_keys SET api_key = $1 WHERE id = 6", stale)
        async with KeyManager(restricted) as km:
            rc = RotationContext(km.sessions, km.kek, restricted)
            with pytest.raises(ConfigurationError, match="row-level security on tenant_keys hides rows"):
                await retire.retire_dek(rc, SCOPE, 1, force_now=True)
        assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
        assert await _check(s, app, app.spec, expected) == {"1", "2"}
    finally:
        await fetch(s.database_url, f"DROP OWNED BY {role}")
        await fetch(s.database_url, f"DROP ROLE {role}")


async def test_an_unqualified_name_found_outside_public_through_the_search_path_is_refused(
    wenv: dict[str, str],
) -> None:
    """``settings`` that this connection's search_path finds in ``billing`` may be another table,
    or none, for the worker's role (its own search_path): the statements would rotate, and the
    proof count, a table other than the one registered."""
    s = _settings(wenv)
    database = s.database_url.rsplit("/", 1)[1]
    await fetch(s.database_url, "CREATE SCHEMA billing")
    await fetch(s.database_url, "CREATE TABLE billing.settings (id int PRIMARY KEY, api_key text)")
    await fetch(s.database_url, f'ALTER DATABASE "{database}" SET search_path = billing, public')
    out = keyrotor("columns", "register", "settings.api_key", "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "settings is billing.settings" in out.stderr and "billing.settings.api_key" in out.stderr
    spec = "billing.settings.api_key"
    out = keyrotor("columns", "register", spec, "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 0, out.stderr


async def test_a_trigger_that_blocks_the_update_fails_the_run_and_keeps_the_old_version(
    wenv: dict[str, str],
) -> None:
    """A ``BEFORE UPDATE`` trigger that keeps the old value (here, of every other row) is not
    seen at registration. The rows are locked when the batch writes them, so an update that
    is not applied is the table's doing, not a concurrent writer's: the run fails saying so
    (rather than waiting, as for locked rows, and retrying for ever), nothing of the batch is
    written, and v1 cannot retire while rows are on it."""
    s = _settings(wenv)
    app = App(
        "CREATE TABLE frozen (id int PRIMARY KEY, api_key text);\n"
        "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN IF OLD.id % 2 = 0 THEN RETURN NULL; END IF; RETURN NEW; END$$;\n"
        "CREATE TRIGGER t BEFORE UPDATE ON frozen FOR EACH ROW EXECUTE FUNCTION keep()",
        "frozen",
        "frozen.api_key",
    )
    for statement in app.ddl.split(";\n"):
        await fetch(s.database_url, statement)
    expected = await _fill(s, app, app.spec)
    out = keyrotor("columns", "register", app.spec, "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 0, out.stderr
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, SCOPE)
        with pytest.raises(UpdateNotApplied, match=r"frozen\.api_key: 1 of 3 updates .* not applied"):
            for r in progress.ranges:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        run = await fetch(s.database_url, "SELECT state, error FROM rotations WHERE id = $1", progress.run.id)
        assert run[0]["state"] == "failed" and "trigger" in run[0]["error"]
        assert await _check(s, app, app.spec, expected) == {"1"}  # the batch was rolled back
        with pytest.raises(UpdateNotApplied):
            await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
    assert await _check(s, app, app.spec, expected) == {"1"}


async def test_a_table_named_like_one_of_keyrotors_in_another_schema_registers(wenv: dict[str, str]) -> None:
    """keyrotor's own tables are refused by what the name resolves to, not by its last part:
    ``billing.secrets`` is the application's, ``public.secrets`` keyrotor's."""
    s = _settings(wenv)
    await fetch(s.database_url, "CREATE SCHEMA billing")
    await fetch(s.database_url, "CREATE TABLE billing.secrets (id int PRIMARY KEY, api_key text)")
    out = keyrotor("columns", "register", "billing.secrets.api_key", "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 0, out.stderr
    for spec in ("secrets.ciphertext", "public.secrets.ciphertext"):
        out = keyrotor("columns", "register", spec, "--pk", "id", "--scope", SCOPE, env=wenv)
        assert out.returncode != 0 and out.stderr.count("\n") == 1, out.stderr
        assert "is keyrotor's own table" in out.stderr, out.stderr


async def test_one_column_registered_under_two_names_is_refused(wenv: dict[str, str]) -> None:
    """``settings.api_key`` and ``public.settings.api_key`` are one column: two registrations
    would give it two context templates, so every rotation would fail on the rows sealed
    with the other one's, and the census would count its rows twice."""
    s = _settings(wenv)
    await fetch(s.database_url, "CREATE TABLE settings (id int PRIMARY KEY, api_key text)")
    out = keyrotor("columns", "register", "settings.api_key", "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 0, out.stderr
    out = keyrotor("columns", "register", "public.settings.api_key", "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode != 0 and out.stderr.count("\n") == 1, out.stderr
    assert "is registered already as settings.api_key" in out.stderr, out.stderr
    assert len(await fetch(s.database_url, "SELECT * FROM managed_columns")) == 1


async def test_a_value_copied_to_another_row_fails_the_run_naming_the_row(wenv: dict[str, str]) -> None:
    """Duplicate ciphertexts across rows: a value is bound to its row's key, so the copy does not
    open there. The run fails naming that row, the value is left as it was, and v1 cannot retire."""
    s = _settings(wenv)
    app = App("CREATE TABLE dup (id int PRIMARY KEY, api_key text)", "dup", "dup.api_key")
    await fetch(s.database_url, app.ddl)
    expected = await _fill(s, app, app.spec)
    await fetch(
        s.database_url, "UPDATE dup SET api_key = (SELECT api_key FROM dup WHERE id = 8) WHERE id = 9"
    )
    out = keyrotor("columns", "register", app.spec, "--pk", "id", "--scope", SCOPE, env=wenv)
    assert out.returncode == 0, out.stderr
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, SCOPE)
        with pytest.raises(RowFailed, match=r"dup\.api_key row id=9"):
            for r in progress.ranges:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        with pytest.raises((RowFailed, KeyStillInUse)):
            await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
    del expected[9]
    copied = await fetch(s.database_url, "SELECT api_key FROM dup WHERE id IN (8, 9) ORDER BY id")
    assert copied[1][0].startswith("kr1:1:")  # left as it was
    rows = await fetch(s.database_url, "DELETE FROM dup WHERE id = 9 RETURNING id")
    assert rows and await _check(s, app, app.spec, expected) <= {"1", "2"}


async def test_create_index_on_a_partitioned_table_is_refused_before_registering(
    wenv: dict[str, str],
) -> None:
    """Postgres cannot build an index CONCURRENTLY on a partitioned table: ``--create-index``
    there is refused before anything is registered, and the recommendation says what to do."""
    s = _settings(wenv)
    await fetch(
        s.database_url, "CREATE TABLE part (id int PRIMARY KEY, api_key text) PARTITION BY RANGE (id)"
    )
    await fetch(
        s.database_url, "CREATE TABLE part_a PARTITION OF part FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"
    )
    args = ("columns", "register", "part.api_key", "--pk", "id", "--scope", SCOPE)
    out = keyrotor(*args, "--create-index", env=wenv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "part is partitioned" in out.stderr, out.stderr
    assert await fetch(s.database_url, "SELECT * FROM managed_columns") == []
    out = keyrotor(*args, env=wenv)
    assert out.returncode == 0, out.stderr
