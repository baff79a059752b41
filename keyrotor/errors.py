"""The keyrotor error tree.

Every error keyrotor raises is a :class:`KeyrotorError`, split by what the caller should do
next:

``PermanentError``
    Retrying will not help (a tampered ciphertext, a wrong key, bad input). Jobs let these
    propagate so arq records the job as failed.
``TransientError``
    An outage (database, Redis, KEK provider). Retry with backoff.

Messages never contain plaintext, key bytes or wrapped DEKs: they name scopes, versions,
row ids and causes only. Each class's docstring is its default message.
"""

from __future__ import annotations


class KeyrotorError(Exception):
    """keyrotor failed."""

    def __init__(self, message: str | None = None) -> None:
        if not message:
            message = (self.__doc__ or "").strip().splitlines()[0]
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# --- permanent: do not retry -------------------------------------------------------------


class PermanentError(KeyrotorError):
    """The operation cannot succeed by retrying it."""


class ConfigurationError(PermanentError):
    """keyrotor is misconfigured."""


class KekMismatch(ConfigurationError):
    """This process's KEK cannot unwrap the stored DEKs (wrong ENCRYPTION_KEY?)."""


class LegacyDecryptDisabled(ConfigurationError):
    """A legacy value was given while ``KEYROTOR_LEGACY_DECRYPT=off``."""


class WeakKeyError(ConfigurationError):
    """The master key is missing or too weak."""


class InvalidInput(PermanentError, ValueError):
    """The input is not valid."""


class InvalidScope(InvalidInput):
    """The scope name is not valid."""


class InvalidValue(InvalidInput):
    """The value cannot be encrypted (empty, too large, or not text)."""


class DecryptionFailed(PermanentError):
    """The value could not be decrypted (wrong key, wrong scope or context, or tampered)."""


class MalformedCiphertext(DecryptionFailed):
    """The value is not a well-formed ciphertext."""


class CiphertextTooLarge(MalformedCiphertext):
    """The value is longer than any ciphertext of ``KEYROTOR_MAX_VALUE_BYTES``; refused unread."""


class ManagerForked(ConfigurationError):
    """This manager was made before a fork() and cannot follow it: make one in this process."""


class KeyVersionUnknown(PermanentError):
    """The key version is unknown (newer than any stored key)."""


class KeyVersionTooOld(PermanentError):
    """The key version has been retired and can no longer decrypt."""


class KeyExhausted(PermanentError):
    """The DEK has made as many encryptions as it safely may: rotate the scope (``keyrotor rotate``)."""


class NotFound(PermanentError, LookupError):
    """The requested object does not exist."""


class ScopeNotFound(NotFound):
    """The scope does not exist."""


class SecretNotFound(NotFound):
    """The secret does not exist."""


class KekError(PermanentError):
    """The KEK provider refused the operation (wrong key, wrong context, disabled key)."""


class AccessDenied(PermanentError, PermissionError):
    """The actor is not allowed to do this."""


class LegacyDecryptThrottled(AccessDenied):
    """Too many failed legacy decrypts by this actor in the current window; refused without scrypt.

    ``first_in_window`` is True on the window's first refusal: the one that is audited.
    ``retry_after_s`` is how long until the window ends and the actor may try again.
    """

    first_in_window: bool = False
    retry_after_s: float = 60.0


class Conflict(PermanentError):
    """The operation conflicts with the current state."""


class StoreRejected(PermanentError):
    """The database refused the statement (invalid data, or a statement that cannot work)."""


class SchemaMissing(ConfigurationError, StoreRejected):
    """The database has no keyrotor schema (or an older one): run `keyrotor db upgrade`."""


# --- transient: retry with backoff -------------------------------------------------------


class TransientError(KeyrotorError):
    """A dependency is unavailable; retrying later may succeed."""


class StoreUnavailable(TransientError):
    """The database is unavailable."""


class StoreBusy(TransientError):
    """The database could not run the statement now (serialization failure, deadlock, lock timeout)."""


class KekUnavailable(TransientError):
    """The KEK provider is unavailable."""


class QueueUnavailable(TransientError):
    """Redis (the job queue) is unavailable."""


class CallTimedOut(TransientError, TimeoutError):
    """The call took longer than its timeout and was cancelled (one already committing may have landed)."""
