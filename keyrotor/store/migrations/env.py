"""Alembic environment: runs on a connection handed in by ``keyrotor.store.db.upgrade``."""

from __future__ import annotations

from alembic import context

from keyrotor.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `keyrotor db upgrade` (keyrotor.store.db.upgrade)")

context.configure(connection=connection, target_metadata=Base.metadata, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
