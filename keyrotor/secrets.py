"""keyrotor's own ``secrets`` table: named values of a scope, sealed with its active DEK.

A secret's context is ``secret:<name>``, so a value opens only under its own name. The grants
and the audit log apply as to any call of the manager: a put is one ``encrypt`` event a value,
a read one ``decrypt`` event. KeyManager has these methods from :class:`SecretsTable`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit import calls
from keyrotor.audit.calls import DECRYPT, ENCRYPT, CallAudit, Who
from keyrotor.audit.durable import DurableAuditWriter
from keyrotor.audit.log import Row, now_us
from keyrotor.audit.writer import AuditWriter
from keyrotor.census.locations import location_of
from keyrotor.census.usage import UsageCounter
from keyrotor.crypto import envelope
from keyrotor.errors import InvalidInput, SecretNotFound
from keyrotor.inputs import check_name, check_new_name, value_bytes
from keyrotor.keyring import KeyRing
from keyrotor.opening import ValueOpener
from keyrotor.settings import Settings
from keyrotor.store import db, repo


class Manager(Protocol):
    """What the secrets table uses of its KeyManager: its keys, its caller checks and its audit."""

    settings: Settings
    ring: KeyRing
    usage: UsageCounter
    calls: CallAudit

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]: ...

    @property
    def audit(self) -> AuditWriter | None: ...

    def _check_scope(self, scope: str) -> None: ...

    opener: ValueOpener


def secret_context(name: str) -> str:
    """The context a secret's value is bound to."""
    return f"secret:{name}"


class SecretsTable:
    """KeyManager's methods over the ``secrets`` table."""

    async def put_secret(
        self: Manager,
        scope: str,
        name: str,
        value: str,
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """Store (or replace) a named value in keyrotor's ``secrets`` table.

        A name is 1-200 printable characters without surrounding spaces, and not ``.`` or ``..``
        (no URL path can carry those, so ``GET /v1/secrets/{scope}/{name}`` could not reach it).

        Raises:
            InvalidScope, InvalidValue, InvalidInput: bad input.
            AccessDenied: no grant lets the actor encrypt in this scope.
        """
        await _put(self, self.calls.who(actor, ip, user_agent), scope, [(name, value)])

    async def put_secrets(
        self: Manager,
        scope: str,
        items: Sequence[tuple[str, str]],
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> int:
        """Store many ``(name, value)`` pairs of one scope in one transaction. Returns the count.

        Each value is one ``encrypt`` audit event (context ``secret:<name>``).

        Raises:
            InvalidScope, InvalidValue, InvalidInput: bad input (a name given twice, too).
            AccessDenied: no grant lets the actor encrypt in this scope.
        """
        return await _put(self, self.calls.who(actor, ip, user_agent), scope, items)

    async def get_secret(
        self: Manager,
        scope: str,
        name: str,
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """Read and decrypt a named value (audited as a ``decrypt`` of context ``secret:<name>``).

        Raises:
            SecretNotFound: no such secret in that scope.
            AccessDenied: no grant lets the actor decrypt in this scope.
        """
        who = self.calls.who(actor, ip, user_agent)
        context = secret_context(name) if isinstance(name, str) else ""
        version: int | None = None
        try:
            self._check_scope(scope)
            check_name(name)
            await self.calls.authorize(who, scope, DECRYPT)
            async with db.transaction(self.sessions) as session:
                row = await repo.get_secret(session, scope, name)
            if row is None:
                raise SecretNotFound(f"no secret {name!r} in scope {scope!r}")
            version = envelope.version_or_none(row.ciphertext)
            value, version = await self.opener.open(scope, row.ciphertext, context, who)
        except Exception as exc:
            await self.calls.failure("failed_decrypt", who, scope, version, context, exc)
            raise
        await self.calls.emit(calls.success("decrypt", who, scope, version, calls.context_metadata(context)))
        return value


async def _put(km: Manager, who: Who, scope: str, items: Sequence[tuple[str, str]]) -> int:
    try:
        version = await _seal_and_store(km, who, scope, items)
    except Exception as exc:
        await km.calls.failure("encrypt", who, scope, None, "", exc, {"values": len(items)})
        raise
    audit = km.audit
    if audit is not None:
        now = now_us()
        rows: list[Row] = [
            ("encrypt", scope, version, True, *who, None, calls.context_metadata(secret_context(n)), now)
            for n, _ in items
        ]
        if isinstance(audit, DurableAuditWriter):
            await audit.put_many(rows)  # one commit for all, not one per value
        else:
            for row in rows:
                await km.calls.emit(row)
    return len(items)


async def _seal_and_store(km: Manager, who: Who, scope: str, items: Sequence[tuple[str, str]]) -> int:
    """Seal every value with the scope's active DEK and upsert them. Returns the DEK version."""
    for name, _ in items:
        check_new_name(name)
    if len({name for name, _ in items}) != len(items):  # one statement cannot upsert a row twice
        raise InvalidInput("put_secrets: a secret name is given more than once")
    km._check_scope(scope)
    await km.calls.authorize(who, scope, ENCRYPT)
    scope_id, version, cipher = await km.ring.encryption_key(scope)
    scope_id, version, cipher = await km.ring.reserve(scope, scope_id, version, cipher, len(items))
    rows = [
        (
            name,
            envelope.seal(
                value_bytes(value, km.settings.max_value_bytes),
                cipher=cipher,
                scope=scope,
                dek_version=version,
                context=secret_context(name),
            ),
        )
        for name, value in items
    ]
    for location, n in Counter(location_of(secret_context(name)) for name, _ in items).items():
        if not km.usage.count(scope_id, version, location, n):
            await km.usage.record(scope_id, version, location, n)
    async with db.transaction(km.sessions) as session:
        await repo.put_secrets(session, scope_id, rows, version)
    return version
