"""The audit rows of KeyManager's calls: who made a call, and what its success, refusal or failure
records (queued as :data:`keyrotor.audit.log.Row` tuples, never holding a value or a ciphertext).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor.audit.checkpoint import Checkpointer, open_audit_key
from keyrotor.audit.durable import DurableAuditWriter
from keyrotor.audit.events import MAX_SHORT_CHARS
from keyrotor.audit.grants import GrantCache
from keyrotor.audit.key import AuditKey
from keyrotor.audit.log import (
    CALLER,
    MAX_ERROR_CHARS,
    Row,
    check_actor,
    clean_short,
    clean_text,
    metadata_json,
    normalize_metadata,
    now_us,
)
from keyrotor.audit.writer import AuditWriter
from keyrotor.errors import AccessDenied, ConfigurationError, InvalidInput, KeyrotorError, SchemaMissing
from keyrotor.inputs import MAX_CONTEXT_CHARS
from keyrotor.kek.base import KekProvider
from keyrotor.settings import Settings

log = logging.getLogger(__name__)

# (actor, ip, user agent) of a call
Who = tuple[str, str | None, str | None]

ENCRYPT, DECRYPT = 0, 1
OPERATION = ("encrypt", "decrypt")
# Event metadata is queued as JSON text.
OPERATION_METADATA = ('{"operation":"encrypt"}', '{"operation":"decrypt"}')
LEGACY_METADATA = '{"format":"legacy"}'
LEGACY_DECRYPT_METADATA = '{"operation":"decrypt","format":"legacy"}'
# context -> its metadata JSON: contexts repeat (a service decrypts the same rows again and again)
_CONTEXT_JSON: dict[str, str] = {"": "{}"}


def context_metadata(context: str) -> str:
    """The metadata JSON of a call with ``context`` (built on every call: memoised, and spelled
    out directly for a context JSON would not escape, which is most of them)."""
    meta = _CONTEXT_JSON.get(context)
    if meta is None:
        # Printable ASCII without a quote or a backslash is its own JSON string (and clean_text
        # leaves it alone): what the encoder would write, without a dict and an encoder call.
        # Contexts often name a row ("users.api_key:42") and rarely repeat in a busy service.
        if (
            context.isascii()
            and context.isprintable()
            and '"' not in context
            and "\\" not in context
            and len(context) <= MAX_CONTEXT_CHARS
        ):
            return f'{{"context":"{context}"}}'
        meta = metadata_json({"context": clean_text(context, MAX_CONTEXT_CHARS)})
        if len(_CONTEXT_JSON) < 10_000:
            _CONTEXT_JSON[context] = meta
    return meta


def success(event_type: str, who: Who, scope: str, version: int | None, metadata: str) -> Row:
    """The row of a call that succeeded."""
    return (event_type, scope, version, True, *who, None, metadata, now_us())


def unauthorized(who: Who, scope: str | None, error: str, metadata: str) -> Row:
    """The ``unauthorized`` row of a refused call (``error``: a message that holds no data)."""
    return ("unauthorized", scope, None, False, *who, error, metadata, now_us())


def failure(
    event_type: str,
    who: Who,
    scope: str | None,
    version: int | None,
    context: object,
    exc: Exception,
    extra: dict[str, Any] | None = None,
) -> Row:
    """The row of a call that failed with ``exc`` (``scope``: None unless it is a valid scope name)."""
    # The typed errors' messages never hold values or ciphertexts; anything else may quote
    # data, so only its class is kept.
    if isinstance(exc, KeyrotorError):
        error = f"{type(exc).__name__}: {clean_text(str(exc), MAX_ERROR_CHARS)}"
    else:
        error = f"{type(exc).__name__} (unexpected error)"
    metadata: dict[str, Any] = {"context": context} if isinstance(context, str) and context else {}
    metadata.update(extra or {})
    return (
        event_type,
        scope,
        version,
        False,
        *who,
        error,
        metadata_json(normalize_metadata(metadata)),
        now_us(),
    )


def failover(who: Who, success: bool, metadata: dict[str, Any], error: str | None) -> Row:
    """The ``failover`` row: DEK reads left the primary region, or returned."""
    return (
        "failover",
        None,
        None,
        success,
        *who,
        error,
        metadata_json(normalize_metadata(metadata)),
        now_us(),
    )


def retired_use(who: Who, scope: str, version: int, location: str) -> Row:
    """The ``retired_key_use`` row of a decrypt that needed a retired DEK version."""
    meta = metadata_json({"location": clean_text(location, MAX_CONTEXT_CHARS)})
    return ("retired_key_use", scope, version, True, *who, None, meta, now_us())


_current_caller = CALLER.get  # the innermost actor_context, read on every call
_MAX_ACTORS = 10_000


class CallAudit:
    """The audit side of a KeyManager: who makes each call, whether a grant allows it, the rows
    of its refusals and failures (successes are queued by the manager itself, inline), and the
    audit writer with the chain's key and signed checkpoints.

    Args:
        settings: ``KEYROTOR_DEFAULT_ACTOR`` and the ``KEYROTOR_AUDIT*`` settings.
        grants: the manager's grants cache.
        valid_scopes: scope names the manager has validated (a failure names only those).

    Raises:
        ConfigurationError: ``KEYROTOR_DEFAULT_ACTOR`` is not a valid actor.
    """

    def __init__(self, settings: Settings, grants: GrantCache, valid_scopes: set[str]) -> None:
        try:
            default_actor = check_actor(settings.default_actor)
        except InvalidInput as exc:
            raise ConfigurationError(f"KEYROTOR_DEFAULT_ACTOR: {exc}") from None
        self.settings = settings
        self.default_who: Who = (default_actor, None, None)
        self._plain_whos: dict[str, Who] = {default_actor: self.default_who}  # validated actors
        # (actor, ip, user agent) as given -> the cleaned caller: an HTTP client sends the same
        # three on every request.
        self._full_whos: dict[tuple[str, str | None, str | None], Who] = {}
        self._grants = grants
        self._valid_scopes = valid_scopes
        # The batched writer (None until open, after close, or with KEYROTOR_AUDIT=off).
        self.writer: AuditWriter | None = None
        # Set once an open writer is closed: from then on a call is refused, not left unaudited
        # (a closing manager's caches could otherwise still decrypt). Cleared by open().
        self._closed = False
        self._checkpoints: Checkpointer | None = None
        self._key: AuditKey | None = None
        self._load_key: Callable[[], Awaitable[AuditKey]] | None = None

    async def open(
        self, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine, kek: KekProvider
    ) -> None:
        """Load the chain's key (keyrotor.audit.key), start its checkpoints and the writer."""
        if self._checkpoints is None:
            self._key, self._load_key, self._checkpoints = await open_audit_key(sessions, kek, self.settings)
        if not self.settings.audit_enabled:
            log.warning("KEYROTOR_AUDIT=off: encrypt/decrypt calls are not audited (not compliant)")
        elif self.writer is None:
            self._closed = False
            # durable: a call returns once its event is committed (keyrotor.audit.durable).
            writer = DurableAuditWriter if self.settings.audit_mode == "durable" else AuditWriter
            self.writer = writer(
                engine,
                queue_max=self.settings.audit_queue_max,
                batch_size=self.settings.audit_batch_size,
                flush_interval_s=self.settings.audit_flush_interval_s,
                close_timeout_s=self.settings.audit_close_timeout_s,
                put_timeout_s=self.settings.audit_put_timeout_s,
                key=self._key,
                key_loader=self._load_key,
            )
            await self.writer.start()

    async def close(self) -> bool:
        """Write every queued event, then sign the final head. Returns whether a writer was open."""
        was_open = self.writer is not None
        if self.writer is not None:
            self._closed = True
            await self.writer.close()  # it refuses new events from the start of its close
            self.writer = None
        if self._checkpoints is not None:  # after the last event: it signs the final head
            await self._checkpoints.close()
            self._checkpoints = None
        return was_open

    def refuse_if_closed(self) -> None:
        """Raise ConfigurationError once an open writer was closed: a call is then refused, not
        left unaudited (with ``KEYROTOR_AUDIT=off`` there is no writer and nothing to refuse)."""
        if self._closed:
            raise ConfigurationError("the audit writer is closed: this KeyManager is closing or closed")

    def who(self, actor: str | None, ip: str | None, user_agent: str | None) -> Who:
        """The caller: keyword arguments, else the innermost actor_context, else the default actor."""
        ctx = _current_caller()
        if ip is None and user_agent is None:
            if actor is None:
                return self.default_who if ctx is None else ctx.who
            if ctx is None:
                who = self._plain_whos.get(actor)
                if who is not None:
                    return who
        elif ctx is None and actor is not None:
            known = self._full_whos.get((actor, ip, user_agent))
            if known is not None:
                return known
        if actor is None:
            name = self.default_who[0] if ctx is None else ctx.actor
        elif actor in self._plain_whos:
            name = actor
        else:
            name = check_actor(actor)
            if len(self._plain_whos) < _MAX_ACTORS:
                self._plain_whos[name] = (name, None, None)
        who = (
            name,
            clean_short(ip) if ip is not None else (ctx.ip if ctx else None),
            clean_short(user_agent) if user_agent is not None else (ctx.user_agent if ctx else None),
        )
        if ctx is None and actor is not None and len(ip or "") + len(user_agent or "") <= 2 * MAX_SHORT_CHARS:
            if len(self._full_whos) >= _MAX_ACTORS:
                self._full_whos.clear()
            self._full_whos[(actor, ip, user_agent)] = who
        return who

    async def authorize(self, who: Who, scope: str, operation: int) -> None:
        """Raise AccessDenied (and record ``unauthorized``) unless a grant allows the call."""
        if (await self._grants.permissions(who[0], scope))[operation]:
            return
        message = f"actor {who[0]!r} may not {OPERATION[operation]} in scope {scope!r}"
        await self.emit(unauthorized(who, scope, message, OPERATION_METADATA[operation]))
        raise AccessDenied(message)

    async def emit(self, row: Row) -> None:
        """Queue ``row`` (nothing when auditing is off).

        Raises:
            ConfigurationError: the writer is closed (the manager is closing or closed).
        """
        audit = self.writer
        if audit is None:
            self.refuse_if_closed()
        elif not audit.offer(row):
            await audit.put(row)

    async def emit_many(self, rows: list[Row]) -> None:
        """Queue ``rows`` together (nothing when auditing is off): in durable mode, return once
        all of them are committed, in the same group commit when they fit in one."""
        audit = self.writer
        if audit is None:
            self.refuse_if_closed()
            return
        if not rows:
            return
        if isinstance(audit, DurableAuditWriter):
            await audit.put_many(rows)
            return
        for row in rows:
            if not audit.offer(row):
                await audit.put(row)

    def failure_row(
        self,
        event_type: str,
        who: Who,
        scope: object,
        version: int | None,
        context: object,
        exc: Exception,
        extra: dict[str, Any] | None = None,
    ) -> Row:
        """The row of a call that failed with ``exc``; it names the scope only if it is valid."""
        known = scope if isinstance(scope, str) and scope in self._valid_scopes else None
        return failure(event_type, who, known, version, context, exc, extra)

    async def failure(
        self,
        event_type: str,
        who: Who,
        scope: object,
        version: int | None,
        context: object,
        exc: Exception,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a call that failed with ``exc`` (a denial was recorded as ``unauthorized`` already)."""
        if self.writer is None or isinstance(exc, AccessDenied):
            return
        try:
            await self.emit(self.failure_row(event_type, who, scope, version, context, exc, extra))
        except SchemaMissing:  # no audit table either: the caller's own error says what to run
            if not isinstance(exc, SchemaMissing):
                raise
        except ConfigurationError:  # closed meanwhile: keep the caller's own error, say so loudly
            log.error("audit writer closed: a %s event (%s) was not recorded", event_type, type(exc).__name__)

    async def failover(self, success: bool, metadata: dict[str, Any], error: str | None) -> None:
        """Record a ``failover`` event (DEK reads left the primary region, or returned)."""
        row = failover(self.default_who, success, metadata, error)
        audit = self.writer
        if isinstance(audit, DurableAuditWriter):
            # Not a caller's event, and the audit database may be what is down: kept until written.
            audit.put_nowait(row)
        else:
            await self.emit(row)
