"""What the library needs in an application's process: KeyManager and KeyrotorClient.

The KEK, audit and replication parts are defined in modules of their own and included here,
since a KeyManager uses all three.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from keyrotor.settings.audit import AuditSettings
from keyrotor.settings.kek import KekSettings
from keyrotor.settings.replication import ReplicationSettings

MIN_DESTROY_AFTER_DAYS = 7
"""The shortest destruction window: a retired DEK keeps its wrapped key at least this long
(failover reads rely on it, :mod:`keyrotor.replication.failover`)."""


class LibrarySettings(ReplicationSettings, AuditSettings, KekSettings):
    """The DEK cache, value limits, new scopes' policy, legacy decrypts and key-change messages."""

    # the DEK cache
    dek_cache_ttl_s: float = Field(default=1800.0, gt=0, validation_alias="KEYROTOR_DEK_CACHE_TTL_SECONDS")
    dek_cache_max_entries: int = Field(
        default=10_000, ge=1, validation_alias="KEYROTOR_DEK_CACHE_MAX_ENTRIES"
    )
    # A hit in the last this-part of a cached DEK's TTL refreshes it in the background (a new
    # unwrap through the KEK), so keys in steady use never expire on a caller's path (0: off).
    # Half the TTL: a key in use costs at most one unwrap per half TTL, all off callers' paths.
    dek_cache_refresh_ahead: float = Field(
        default=0.5, ge=0.0, lt=1.0, validation_alias="KEYROTOR_DEK_CACHE_REFRESH_AHEAD"
    )
    # How long a process trusts its idea of a scope's active version without hearing from
    # Redis. Rotation also broadcasts, so this only bounds a process that missed the message.
    # At most a day: the shortest destruction window is 7 days, and a process that trusted an
    # old version for longer could still seal values with a DEK destroyed meanwhile.
    active_version_ttl_s: float = Field(
        default=30.0, gt=0, le=86_400, validation_alias="KEYROTOR_ACTIVE_VERSION_TTL_SECONDS"
    )

    # values
    max_value_bytes: int = Field(
        default=32_768, ge=1, le=1_048_576, validation_alias="KEYROTOR_MAX_VALUE_BYTES"
    )

    # rotation defaults for new scopes
    default_rotation_enabled: bool = Field(default=True, validation_alias="KEYROTOR_DEFAULT_ROTATION_ENABLED")
    default_interval_days: int = Field(
        default=90, ge=1, le=365, validation_alias="KEYROTOR_DEFAULT_INTERVAL_DAYS"
    )
    default_grace_days: int = Field(default=7, ge=0, le=365, validation_alias="KEYROTOR_DEFAULT_GRACE_DAYS")
    # How long a retired DEK keeps its wrapped key (decrypt-only) before it may be erased; any use
    # meanwhile cancels the erasure. At least a week, as AWS KMS's pending deletion.
    destroy_after_days: int = Field(
        default=30, ge=MIN_DESTROY_AFTER_DAYS, le=3650, validation_alias="KEYROTOR_DESTROY_AFTER_DAYS"
    )
    # Rotate a DEK early once it has encrypted this many values (a scope's `max_encryptions`
    # overrides it); encrypt refuses past it when rotation is disabled, and past twice it (at
    # most 2**31) otherwise (keyrotor.census.usage). Random 96-bit GCM nonces: NIST's bound is 2**32.
    max_encryptions_per_dek: int = Field(
        default=2**30, ge=1, le=2**31, validation_alias="KEYROTOR_MAX_ENCRYPTIONS_PER_DEK"
    )
    # How often a KeyManager adds its in-process encryption counts to `data_keys.encryptions`.
    usage_flush_interval_s: float = Field(
        default=10.0, gt=0, le=3_600, validation_alias="KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS"
    )

    # legacy values in KeyManager.decrypt (one scrypt each): at most this many at once, in a pool
    # of their own, and an actor's failures beyond the budget a minute are refused without scrypt.
    legacy_decrypt_concurrency: int = Field(
        default=2, ge=1, le=64, validation_alias="KEYROTOR_LEGACY_DECRYPT_CONCURRENCY"
    )
    # Whether KeyManager opens legacy values at all (only through their registered row, see
    # keyrotor.legacy.scope). "off" once `keyrotor legacy migrate` reports none left.
    legacy_decrypt: Literal["on", "off"] = Field(default="on", validation_alias="KEYROTOR_LEGACY_DECRYPT")
    legacy_failures_per_minute: int = Field(
        default=10, ge=1, le=100_000, validation_alias="KEYROTOR_LEGACY_FAILURES_PER_MINUTE"
    )

    # the queue and key-change messages, shared with the worker (DESIGN.md "Rotation of a scope's DEK")
    # arq queue KeyrotorClient enqueues into; deployments sharing one Redis use different names
    # (job ids derive from it too).
    queue_name: str = Field(
        default="keyrotor:queue", min_length=1, max_length=100, validation_alias="KEYROTOR_QUEUE_NAME"
    )
    # Redis pub/sub channel announcing key changes; KeyManagers listen and drop stale caches.
    notify_channel: str = Field(
        default="keyrotor:keys", min_length=1, max_length=100, validation_alias="KEYROTOR_NOTIFY_CHANNEL"
    )
    listen_key_changes: bool = Field(default=True, validation_alias="KEYROTOR_LISTEN_KEY_CHANGES")

    @model_validator(mode="after")
    def _default_grace_within_interval(self) -> Self:
        # The same rule as `keyrotor policy set`: refused, not clamped, so new scopes never get
        # a policy other than the one configured.
        if self.default_grace_days > self.default_interval_days:
            raise ValueError(
                f"KEYROTOR_DEFAULT_GRACE_DAYS ({self.default_grace_days}) cannot be longer than "
                f"KEYROTOR_DEFAULT_INTERVAL_DAYS ({self.default_interval_days})"
            )
        return self
