"""usage guards: the application may hasten a rotation, never put one off

Revision ID: 0007_usage_guards
Revises: 0006_replicas

The application role may write two things the scheduler reads (``deploy/postgres/roles.sql``):
``data_keys.encryptions`` (its usage counter adds what it encrypted) and
``key_scopes.next_rotation_at`` (a DEK at its encryption limit makes its scope due now). Column
grants cannot say "only upwards", so a compromised application could reset a DEK's count or push
its scope's next rotation into the future, keeping a key in use past its limit. Two triggers
close that:

- ``encryptions`` never decreases, whoever writes it (nothing in keyrotor ever lowers it);
- ``next_rotation_at`` may move later, or be cleared, only by a role that can also update
  ``rotations`` (the worker, the scheduler, the owner running ``policy set``); the application
  can only bring it closer.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_usage_guards"
down_revision: str | Sequence[str] | None = "0006_replicas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION keyrotor_encryptions_never_decrease() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.encryptions < OLD.encryptions THEN
                RAISE EXCEPTION 'data_keys.encryptions never decreases (DEK id %)', OLD.id
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER trg_data_keys_encryptions_never_decrease
        BEFORE UPDATE OF encryptions ON data_keys
        FOR EACH ROW EXECUTE FUNCTION keyrotor_encryptions_never_decrease()
        """
    )
    op.execute(
        """
        CREATE FUNCTION keyrotor_rotation_not_postponed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.next_rotation_at IS DISTINCT FROM OLD.next_rotation_at
               AND (NEW.next_rotation_at IS NULL
                    OR (OLD.next_rotation_at IS NOT NULL AND NEW.next_rotation_at > OLD.next_rotation_at))
               AND NOT has_table_privilege(current_user, 'rotations', 'UPDATE') THEN
                RAISE EXCEPTION 'only the worker, the scheduler or an administrator may postpone '
                    'a rotation (scope id %)', OLD.id USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER trg_key_scopes_rotation_not_postponed
        BEFORE UPDATE OF next_rotation_at ON key_scopes
        FOR EACH ROW EXECUTE FUNCTION keyrotor_rotation_not_postponed()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER trg_key_scopes_rotation_not_postponed ON key_scopes")
    op.execute("DROP FUNCTION keyrotor_rotation_not_postponed()")
    op.execute("DROP TRIGGER trg_data_keys_encryptions_never_decrease ON data_keys")
    op.execute("DROP FUNCTION keyrotor_encryptions_never_decrease()")
