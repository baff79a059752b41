"""Many values of one scope in one call: ``KeyManager.decrypt_many`` (:class:`BatchCalls`).

``keyrotor serve``'s ``/v1/decrypt/batch`` is its caller. A batch is one pass over its items,
with no task or future of its own per item: one grant check for the scope, then each value as
``KeyManager.decrypt`` opens it (:class:`keyrotor.opening.ValueOpener`), and all of the batch's
audit events queued at once. In durable mode they then share one group commit (one statement)
instead of each waiting for its own place in one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from keyrotor import metrics
from keyrotor.audit import calls
from keyrotor.audit.calls import DECRYPT, LEGACY_METADATA, CallAudit, Who
from keyrotor.audit.grants import GrantCache
from keyrotor.audit.log import Row, now_us
from keyrotor.cache import DekCache
from keyrotor.crypto import envelope
from keyrotor.errors import AccessDenied, InvalidScope, KeyrotorError, TransientError
from keyrotor.inputs import MAX_CONTEXT_CHARS
from keyrotor.keyring import KeyRing
from keyrotor.opening import ValueOpener


class Manager(Protocol):
    """What a batch uses of its KeyManager: the caller checks, the caches, the audit."""

    grants: GrantCache
    calls: CallAudit
    cache: DekCache
    ring: KeyRing
    opener: ValueOpener
    _max_ciphertext_chars: int

    @property
    def _sessions(self) -> object: ...

    def _who(self, actor: str | None, ip: str | None, user_agent: str | None) -> Who: ...

    def _decrypt_checks(self, scope: str, ciphertext: str, context: str) -> None: ...

    def _check_scope(self, scope: str) -> None: ...


class BatchCalls:
    """KeyManager's calls over many values of one scope."""

    async def decrypt_many(
        self: Manager,
        scope: str,
        items: Sequence[tuple[str, str]],
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> list[str | KeyrotorError]:
        """Decrypt ``(ciphertext, context)`` pairs of one scope in one pass.

        One grant check for the scope; each value is decrypted and audited as :meth:`decrypt`
        does it (a ``decrypt`` or ``failed_decrypt`` event each), and the events are queued
        together: in durable mode the call returns once all of them are committed, in one
        group commit when they fit.

        Returns:
            Each item's plaintext, or the permanent error that refused it (in order).

        Raises:
            InvalidScope: ``scope`` is not a scope name (nothing is decrypted).
            AccessDenied: no grant lets the actor decrypt in this scope (nothing is decrypted).
            StoreUnavailable, KekUnavailable: an outage (transient); no plaintext is returned.
        """
        who = self._who(actor, ip, user_agent)
        await _check_scope(self, scope, who)
        allowed = self.grants.cached(who[0], scope)
        if allowed is None or not allowed[DECRYPT]:
            await self.calls.authorize(who, scope, DECRYPT)
        results: list[str | KeyrotorError] = []
        rows: list[Row] = []
        cached, full, max_chars = self.opener.cached, self.opener.open, self._max_ciphertext_chars
        for ciphertext, context in items:
            try:
                texts = ciphertext.__class__ is str and context.__class__ is str
                if not texts or len(ciphertext) > max_chars or len(context) > MAX_CONTEXT_CHARS:
                    self._decrypt_checks(scope, ciphertext, context)
                hit = cached(scope, ciphertext, context)
                value, version = await full(scope, ciphertext, context, who) if hit is None else hit
            except Exception as exc:
                metrics.decrypt_failed(exc)
                if not isinstance(exc, AccessDenied):  # a denial is recorded as `unauthorized`
                    version = envelope.version_or_none(ciphertext)
                    rows.append(self.calls.failure_row("failed_decrypt", who, scope, version, context, exc))
                if not isinstance(exc, KeyrotorError) or isinstance(exc, TransientError | AccessDenied):
                    # The whole call fails (no plaintext leaves), and what it did is recorded.
                    await self.calls.emit_many(rows)
                    raise
                results.append(exc)
                continue
            meta = calls.context_metadata(context) if version is not None else LEGACY_METADATA
            rows.append(("decrypt", scope, version, True, *who, None, meta, now_us()))
            results.append(value)
        await self.calls.emit_many(rows)
        if self.cache.due:
            self.ring.refresh_due(self._sessions is not None)
        return results


async def _check_scope(km: Manager, scope: str, who: Who) -> None:
    """The scope's name, checked before its grants as ``decrypt`` does: text that is not a scope
    name never reaches a grant lookup, a denial's message or an ``unauthorized`` event."""
    try:
        km._check_scope(scope)
    except InvalidScope as exc:
        metrics.decrypt_failed(exc)
        await km.calls.failure("failed_decrypt", who, None, None, "", exc)
        raise
