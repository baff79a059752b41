"""Opening a stored value: the parse memo and the DEK cache first, the full path behind them.

``KeyManager.decrypt``, ``KeyManager.decrypt_many`` (:mod:`keyrotor.batches`) and the secrets
table (:mod:`keyrotor.secrets`) open values through one :class:`ValueOpener`, so the conditions
under which a value may skip the key ring's checks are written once. It checks no grant and
writes no audit event: its callers do both.
"""

from __future__ import annotations

from keyrotor.audit.calls import Who
from keyrotor.cache import DekCache
from keyrotor.crypto import envelope
from keyrotor.keyring import KeyRing
from keyrotor.legacy.reader import LegacyReader

_split_kr1, _open_text = envelope.split_kr1, envelope.open_text

# Parsed kr1 values, keyed by their text. A stored value is decrypted again on every request
# that uses it, and parsing it (strict base64url) costs about twice the AES-GCM call. Ciphertext
# is not secret; the memo holds only (version, nonce||ciphertext||tag), and only of values that
# authenticated, so a caller cannot fill it with forgeries. It is bounded in bytes, not entries
# (an entry is charged its text, its bytes and PARSED_OVERHEAD for the objects and the dict
# slot), and emptied when full; values longer than PARSED_MAX_CHARS (far beyond an API key) are
# not kept at all, as parsing is then small beside the AES-GCM call.
PARSED_BUDGET_BYTES = 4 * 1024 * 1024
PARSED_MAX_CHARS = 4096
PARSED_OVERHEAD = 256


class ValueOpener:
    """Opens ``kr1`` values (and hands legacy ones to the legacy reader) for one KeyManager."""

    __slots__ = (
        "_cache_get",
        "_cache_probe",
        "_legacy",
        "_parsed",
        "_parsed_bytes",
        "_retired",
        "_ring",
        "_unconfirmed",
    )

    def __init__(self, cache: DekCache, ring: KeyRing, legacy: LegacyReader) -> None:
        self._cache_get, self._cache_probe = cache.get, cache.probe
        self._ring = ring
        self._legacy = legacy
        # The ring's state, tested in place: both dicts are empty in the normal case.
        self._retired, self._unconfirmed = ring.retired, ring.unconfirmed
        self._parsed: dict[str, tuple[int, bytes]] = {}
        self._parsed_bytes = 0

    def cached(self, scope: str, ciphertext: str, context: str) -> tuple[str, int] | None:
        """The hot path: the plaintext and DEK version of a value that authenticated before,
        under a cached DEK whose state needs no check. None: use :meth:`open`.

        Raises:
            DecryptionFailed: wrong scope or context, or not UTF-8.
        """
        if self._unconfirmed or self._retired:
            return None
        try:
            memo = self._parsed.get(ciphertext)
        except TypeError:  # not text (unhashable): open() refuses it with its typed error
            return None
        if memo is None:
            return None
        cipher = self._cache_probe(scope, memo[0])  # a miss is counted once, by open()
        if cipher is None:
            return None
        return _open_text(memo[1], cipher, scope, memo[0], context), memo[0]

    async def open(self, scope: str, ciphertext: str, context: str, who: Who) -> tuple[str, int | None]:
        """The plaintext and its DEK version (None for a legacy value), through the key ring:
        the DEK loaded and its state checked as needed, a use of a retired DEK recorded
        (``KeyRing.retired_use``).

        Raises:
            MalformedCiphertext, DecryptionFailed, KeyVersionUnknown, KeyVersionTooOld,
            ScopeNotFound: as ``KeyManager.decrypt``.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        parsed = self._parsed.get(ciphertext) if ciphertext.__class__ is str else None
        fresh = parsed is None
        if parsed is None:
            parsed = _split_kr1(ciphertext)
            if parsed is None:  # not kr1: a legacy value, or nothing
                return await self._legacy.decrypt(scope, ciphertext, context, who), None
        version, raw = parsed
        cipher = await self._ring.usable(scope, version, self._cache_get(scope, version))
        value = _open_text(raw, cipher, scope, version, context)
        if fresh:
            self._remember(ciphertext, parsed)
        if self._retired and (scope, version) in self._retired:
            await self._ring.retired_use(who, scope, version, context)
        return value, version

    def _remember(self, ciphertext: str, parsed: tuple[int, bytes]) -> None:
        """Keep the parse of a value that authenticated (see PARSED_BUDGET_BYTES)."""
        if len(ciphertext) > PARSED_MAX_CHARS:
            return
        size = len(ciphertext) + len(parsed[1]) + PARSED_OVERHEAD
        if self._parsed_bytes + size > PARSED_BUDGET_BYTES:
            self._parsed.clear()
            self._parsed_bytes = 0
        self._parsed[ciphertext] = parsed
        self._parsed_bytes += size
