-- keyrotor: least-privilege Postgres roles.
--
-- Run once per database as the owner of keyrotor's tables (the role that runs
-- `keyrotor db upgrade`), after the migrations:
--
--     psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--
-- then give passwords and LOGIN (ALTER ROLE keyrotor_app LOGIN PASSWORD '...') or map the
-- roles to your IAM/certificate users. Re-running it is harmless. tests/reliability/
-- test_privileges.py runs this file (role names suffixed) and checks every line below.
--
-- keyrotor_app     the application (KeyManager). Reads and writes `secrets`; records where its
--                  values live (`key_locations`, counts only); reads only the DEKs that
--                  decrypt (pending, active, grace, retired) through row-level security, so it
--                  never sees the history of destroyed keys; creates the first
--                  DEK of a new scope; appends to the audit log but can never change or
--                  delete a row of it; appends the uses of retired DEKs (which cancel their
--                  destruction). It cannot rotate, retire, restore or rewrap anything.
-- keyrotor_worker  `keyrotor worker` and `keyrotor scheduler`: rotation, retirement, rewrap,
--                  migration. Every keyrotor table, all DEK rows, but it too only appends to
--                  the audit log. Pruning the audit log stays with the owner.
-- Neither role owns a table, so neither can ALTER, DROP, TRUNCATE or disable RLS.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keyrotor_app') THEN
        CREATE ROLE keyrotor_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keyrotor_worker') THEN
        CREATE ROLE keyrotor_worker NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO keyrotor_app, keyrotor_worker;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM keyrotor_app, keyrotor_worker;

-- The application ---------------------------------------------------------------------------
GRANT SELECT, INSERT, UPDATE, DELETE ON secrets TO keyrotor_app;
GRANT SELECT, INSERT ON key_scopes TO keyrotor_app;
-- The usage counter makes a scope due early (keyrotor/census/usage.py); nothing else of a scope.
GRANT UPDATE (next_rotation_at, updated_at) ON key_scopes TO keyrotor_app;
GRANT SELECT, INSERT ON data_keys TO keyrotor_app;
-- The usage counter adds the application's encryptions to its live DEKs' counts, which the
-- per-DEK encryption limit reads (keyrotor/census/usage.py); no other column of a DEK.
GRANT UPDATE (encryptions) ON data_keys TO keyrotor_app;
GRANT SELECT, INSERT ON encryption_audit_log TO keyrotor_app;
GRANT SELECT ON encryption_grants, managed_columns, rotations TO keyrotor_app;
-- The census of where values live (keyrotor/census/locations.py): each encrypt records its location
-- and the usage counter adds counts; nothing else of a row, and never a delete. The
-- acknowledged locations are the operator's (`keyrotor columns ignore`, worker role).
GRANT SELECT, INSERT ON key_locations TO keyrotor_app;
GRANT UPDATE (encryptions, last_seen) ON key_locations TO keyrotor_app;
GRANT SELECT ON location_acks TO keyrotor_app;
-- A decrypt with a retired DEK version is recorded (it cancels that version's destruction);
-- the application only appends.
GRANT INSERT ON retired_key_uses TO keyrotor_app;
GRANT USAGE ON SEQUENCE secrets_id_seq, key_scopes_id_seq, data_keys_id_seq TO keyrotor_app;

-- The worker and scheduler -------------------------------------------------------------------
GRANT SELECT, INSERT, UPDATE, DELETE
    ON secrets, key_scopes, data_keys, rotations, rotation_ranges, managed_columns,
       encryption_grants, key_locations, location_acks, retired_key_uses
    TO keyrotor_worker;
GRANT SELECT ON alembic_version TO keyrotor_worker;
GRANT SELECT, INSERT ON encryption_audit_log TO keyrotor_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO keyrotor_worker;
-- The install salt of the local KEK derivation (migration 0010): every process that opens the
-- KEK provider reads it; nobody but the owner writes it.
DO $$
BEGIN
    IF to_regclass('public.install_salt') IS NOT NULL THEN
        GRANT SELECT ON install_salt TO keyrotor_app, keyrotor_worker;
    END IF;
END
$$;
-- The audit key (migration 0011): wrapped by the KEK; the first process to open the provider
-- creates it, every writer reads it; nobody but the owner changes or removes it.
DO $$
BEGIN
    IF to_regclass('public.audit_keys') IS NOT NULL THEN
        GRANT SELECT, INSERT ON audit_keys TO keyrotor_app, keyrotor_worker;
        GRANT UPDATE (kek_id, kek_version, wrapped) ON audit_keys TO keyrotor_worker;
    END IF;
END
$$;
-- Replication tables, where that migration has run.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['kek_replicas', 'replica_keys', 'replica_promotions'] LOOP
        IF to_regclass('public.' || t) IS NOT NULL THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO keyrotor_worker', t);
        END IF;
    END LOOP;
END
$$;

-- Row-level security on data_keys: the history is the worker's ---------------------------------
ALTER TABLE data_keys ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS keyrotor_app_live_keys ON data_keys;
CREATE POLICY keyrotor_app_live_keys ON data_keys FOR SELECT TO keyrotor_app
    USING (state IN ('pending', 'active', 'grace', 'retired'));
DROP POLICY IF EXISTS keyrotor_app_first_key ON data_keys;
CREATE POLICY keyrotor_app_first_key ON data_keys FOR INSERT TO keyrotor_app
    WITH CHECK (state IN ('pending', 'active'));
DROP POLICY IF EXISTS keyrotor_app_count_usage ON data_keys;
CREATE POLICY keyrotor_app_count_usage ON data_keys FOR UPDATE TO keyrotor_app
    USING (state IN ('pending', 'active', 'grace')) WITH CHECK (state IN ('pending', 'active', 'grace'));
DROP POLICY IF EXISTS keyrotor_worker_all_keys ON data_keys;
CREATE POLICY keyrotor_worker_all_keys ON data_keys TO keyrotor_worker USING (true) WITH CHECK (true);
-- API tokens (migration 0012): `keyrotor serve` (the app role) reads them by hash;
-- `keyrotor tokens create|revoke` runs as the worker role or the owner.
DO $$
BEGIN
    IF to_regclass('public.api_tokens') IS NOT NULL THEN
        GRANT SELECT ON api_tokens TO keyrotor_app;
        GRANT SELECT, INSERT, UPDATE ON api_tokens TO keyrotor_worker;
    END IF;
END
$$;
