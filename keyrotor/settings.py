"""Settings, read from the environment once.

``Settings.from_env()`` runs once per process (in the worker, the CLI, or an application's
start-up) and its values travel down as arguments. Applications that configure in code build
``Settings(...)`` directly with the same field names.

Environment variable names follow the old backend (``ENCRYPTION_KEY``, ``SECRETS_PROVIDER``)
and common conventions (``DATABASE_URL``, ``REDIS_URL``); keyrotor's own knobs are prefixed
``KEYROTOR_``. The README's configuration reference lists them all.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from keyrotor.errors import ConfigurationError

# KEYROTOR_AUDIT took a boolean before it had modes: its spellings of "on" and "off".
_AUDIT_ALIASES = {w: "durable" for w in ("on", "true", "1", "yes")} | {w: "off" for w in ("false", "0", "no")}
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("_ENVIRON", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """Reads the mapping handed to ``from_env`` instead of ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        source = os.environ if environ is None else environ
        return {k.lower(): v for k, v in source.items()}


def _env(name: str, *more: str) -> Any:
    return Field(validation_alias=AliasChoices(name, *more))


class Settings(BaseSettings):
    """All of keyrotor's configuration. Frozen: build a new one to change anything."""

    model_config = SettingsConfigDict(
        frozen=True, populate_by_name=True, extra="ignore", case_sensitive=False
    )

    # connections
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/keyrotor", validation_alias="DATABASE_URL", repr=False
    )
    # URLs may carry passwords: kept out of repr.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL", repr=False)

    # the KEK
    secrets_provider: Literal["local", "aws", "vault"] = Field(
        default="local", validation_alias="SECRETS_PROVIDER"
    )
    encryption_key: SecretStr | None = Field(default=None, validation_alias="ENCRYPTION_KEY")
    encryption_key_version: int = Field(default=1, ge=1, validation_alias="ENCRYPTION_KEY_VERSION")
    encryption_keys_previous: dict[int, SecretStr] = Field(
        default_factory=dict, validation_alias="ENCRYPTION_KEYS_PREVIOUS"
    )
    # Providers (besides SECRETS_PROVIDER) that unwrap the DEKs they wrapped, comma-separated
    # (`aws,vault`): set during a provider migration (docs/providers.md).
    kek_read_providers: str = Field(default="", validation_alias="KEYROTOR_KEK_READ_PROVIDERS")
    # The old backend's master key, for legacy values; defaults to ENCRYPTION_KEY.
    legacy_encryption_key: SecretStr | None = Field(default=None, validation_alias="KEYROTOR_LEGACY_KEY")

    # the DEK cache
    dek_cache_ttl_s: float = Field(default=1800.0, gt=0, validation_alias="KEYROTOR_DEK_CACHE_TTL_SECONDS")
    dek_cache_max_entries: int = Field(
        default=10_000, ge=1, validation_alias="KEYROTOR_DEK_CACHE_MAX_ENTRIES"
    )
    # A hit in the last this-part of a cached DEK's TTL refreshes it in the background (a new
    # unwrap through the KEK), so keys in steady use never expire on a caller's path (0: off).
    # 0.5: a key in use costs at most one unwrap per half TTL, off every caller's path
    # (bench/bench_cache.py: 91.8% -> 95.1% hits on its mixed trace, the seed's 95% beaten).
    dek_cache_refresh_ahead: float = Field(
        default=0.5, ge=0.0, lt=1.0, validation_alias="KEYROTOR_DEK_CACHE_REFRESH_AHEAD"
    )
    # How long a process trusts its idea of a scope's active version without hearing from
    # Redis. Rotation also broadcasts, so this only bounds a process that missed the message.
    active_version_ttl_s: float = Field(
        default=30.0, gt=0, validation_alias="KEYROTOR_ACTIVE_VERSION_TTL_SECONDS"
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
    destroy_after_days: int = Field(default=30, ge=7, le=3650, validation_alias="KEYROTOR_DESTROY_AFTER_DAYS")
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

    # the scheduler (worker/scheduler.py)
    scan_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, validation_alias="KEYROTOR_SCAN_INTERVAL_SECONDS"
    )
    replica_check_interval_s: float = Field(
        default=3_600.0, gt=0, le=86_400, validation_alias="KEYROTOR_REPLICA_CHECK_INTERVAL_SECONDS"
    )
    # A leading scheduler that stops answering (hung, SIGSTOP) loses its lock after this long
    # without pinging it (Postgres idle_session_timeout); a standby then takes over at its next scan.
    scheduler_leader_timeout_s: float = Field(
        default=30.0, ge=2, le=3_600, validation_alias="KEYROTOR_SCHEDULER_LEADER_TIMEOUT_SECONDS"
    )
    # The leading scheduler recounts rows per DEK version (keyrotor_rows_per_dek_version) at most
    # this often: the count reads the whole secrets index.
    rows_metric_interval_s: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="KEYROTOR_ROWS_METRIC_INTERVAL_SECONDS"
    )
    # ... with a series per scope for this many scopes (those with the most rows); the rest are
    # summed per version under scope="(other)", so a scope per tenant cannot flood Prometheus.
    rows_metric_max_scopes: int = Field(
        default=200, ge=0, le=100_000, validation_alias="KEYROTOR_ROWS_METRIC_MAX_SCOPES"
    )
    # Due scopes are read and opened this many at a time, one transaction a batch.
    scan_batch_size: int = Field(default=500, ge=1, le=10_000, validation_alias="KEYROTOR_SCAN_BATCH_SIZE")
    # A scope whose last runs failed waits base * 2**(failures - 1), at most max, before the next try.
    schedule_backoff_s: float = Field(
        default=300.0, gt=0, validation_alias="KEYROTOR_SCHEDULE_BACKOFF_SECONDS"
    )
    schedule_backoff_max_s: float = Field(
        default=21_600.0, gt=0, validation_alias="KEYROTOR_SCHEDULE_BACKOFF_MAX_SECONDS"
    )
    # Redis key naming the leading scheduler (value: its instance id), for health checks.
    scheduler_leader_key: str = Field(
        default="keyrotor:scheduler:leader",
        min_length=1,
        max_length=200,
        validation_alias="KEYROTOR_SCHEDULER_LEADER_KEY",
    )
    # Dry runs estimate a rotation's duration at this re-encryption rate until rotations have been
    # measured (bench/bench_rotation.py: 20-30k rows/s a worker process on 2 cores; the low end).
    estimate_rows_per_second: float = Field(
        default=20_000.0, gt=0, validation_alias="KEYROTOR_ESTIMATE_ROWS_PER_SECOND"
    )

    # the rotation worker (DESIGN.md "Rotation of a scope's DEK")
    # arq queue; deployments sharing one Redis use different names (job ids derive from it too).
    queue_name: str = Field(
        default="keyrotor:queue", min_length=1, max_length=100, validation_alias="KEYROTOR_QUEUE_NAME"
    )
    # Redis pub/sub channel announcing key changes; KeyManagers listen and drop stale caches.
    notify_channel: str = Field(
        default="keyrotor:keys", min_length=1, max_length=100, validation_alias="KEYROTOR_NOTIFY_CHANNEL"
    )
    listen_key_changes: bool = Field(default=True, validation_alias="KEYROTOR_LISTEN_KEY_CHANGES")
    # Below this many rows a scope rotates in one transaction; above, it fans out into id ranges.
    small_scope_rows: int = Field(default=1_000, ge=0, validation_alias="KEYROTOR_SMALL_SCOPE_ROWS")
    reencrypt_batch_rows: int = Field(
        default=2_000, ge=1, le=50_000, validation_alias="KEYROTOR_REENCRYPT_BATCH_ROWS"
    )
    reencrypt_range_rows: int = Field(default=50_000, ge=1, validation_alias="KEYROTOR_REENCRYPT_RANGE_ROWS")
    # Budgets; 0 means unlimited, fractions are fine (0.5: one every 2 s), NaN/inf are refused.
    # The row budget is per worker process (it caps one worker's load on the database); the KEK
    # call budget is one for all the workers of a queue on a Redis (keyrotor/kek/budget.py), because
    # a KMS quota is the account's.
    reencrypt_rows_per_second: float = Field(
        default=0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        validation_alias="KEYROTOR_REENCRYPT_ROWS_PER_SECOND",
    )
    kek_calls_per_second: float = Field(
        default=0, ge=0, le=1_000_000, allow_inf_nan=False, validation_alias="KEYROTOR_KEK_CALLS_PER_SECOND"
    )
    kek_rewrap_batch: int = Field(default=100, ge=1, le=1_000, validation_alias="KEYROTOR_KEK_REWRAP_BATCH")
    worker_max_jobs: int = Field(default=4, ge=1, le=100, validation_alias="KEYROTOR_WORKER_MAX_JOBS")
    worker_poll_delay_s: float = Field(
        default=0.5, gt=0, le=60, validation_alias="KEYROTOR_WORKER_POLL_DELAY_SECONDS"
    )
    job_timeout_s: float = Field(default=1_800, gt=0, validation_alias="KEYROTOR_JOB_TIMEOUT_SECONDS")
    job_max_tries: int = Field(default=20, ge=1, validation_alias="KEYROTOR_JOB_MAX_TRIES")
    # A running job's arq "in progress" key lives this long unless its worker renews it, so the
    # job of a killed worker is picked up again after at most this long.
    job_lease_s: float = Field(default=15, ge=1, validation_alias="KEYROTOR_JOB_LEASE_SECONDS")
    retry_backoff_s: float = Field(default=1.0, gt=0, validation_alias="KEYROTOR_RETRY_BACKOFF_SECONDS")
    retry_backoff_max_s: float = Field(
        default=60.0, gt=0, validation_alias="KEYROTOR_RETRY_BACKOFF_MAX_SECONDS"
    )
    # legacy migration (keyrotor legacy migrate): rows a batch (one transaction, one round of the
    # scrypt pool: ~50 ms a value, so 64 rows take ~1.6 s on 2 cores) and pool processes (0: a core each).
    legacy_batch_rows: int = Field(default=64, ge=1, le=10_000, validation_alias="KEYROTOR_LEGACY_BATCH_ROWS")
    legacy_workers: int = Field(default=0, ge=0, le=256, validation_alias="KEYROTOR_LEGACY_WORKERS")
    # A migration of at least twice this many legacy values is split into id ranges of about
    # this many, one migrate_legacy_range job each, so every worker's pool takes part (0: never).
    legacy_range_rows: int = Field(
        default=2_000, ge=0, le=10_000_000, validation_alias="KEYROTOR_LEGACY_RANGE_ROWS"
    )
    # KeyManager.decrypt of legacy values (one scrypt each): at most this many at once, in a pool
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
    # Test only: sleep between re-encryption batches, to open a window for crash tests.
    test_batch_delay_s: float = Field(default=0, ge=0, le=60, validation_alias="KEYROTOR_TEST_BATCH_DELAY_S")

    # /metrics, /healthz, /readyz of the worker and the scheduler (worker/http.py); port 0: off.
    metrics_port: int = Field(default=9108, ge=0, le=65_535, validation_alias="KEYROTOR_METRICS_PORT")
    # Loopback by default: /metrics has no authentication and its labels name scopes (tenants).
    # Deployments that scrape from another host or probe over the pod network bind 0.0.0.0.
    metrics_host: str = Field(default="127.0.0.1", validation_alias="KEYROTOR_METRICS_HOST")
    metrics_scope_labels: Literal["plain", "hashed", "off"] = Field(
        default="plain", validation_alias="KEYROTOR_METRICS_SCOPE_LABELS"
    )
    # How long /readyz trusts its last KEK provider check.
    kek_check_ttl_s: float = Field(
        default=30.0, gt=0, le=30.0, validation_alias="KEYROTOR_KEK_CHECK_TTL_SECONDS"
    )

    # multi-region KEK replication (docs/replication.md). Secondaries are `name=database_url`
    # pairs, comma-separated; each region's wrapping key comes from `KEYROTOR_REGION_<NAME>__*`
    # variables (the same names as the primary's provider settings, prefixed).
    primary_region: str = Field(
        default="primary", min_length=1, max_length=63, validation_alias="KEYROTOR_PRIMARY_REGION"
    )
    regions: str = Field(default="", validation_alias="KEYROTOR_REGIONS", repr=False)
    # The replica check re-replicates stale, missing, drifted and corrupt copies (false: report only).
    replica_repair: bool = Field(default=True, validation_alias="KEYROTOR_REPLICA_REPAIR")
    # A primary that failed is skipped (reads go to the secondaries) for this long, then retried.
    failover_retry_s: float = Field(
        default=5.0, gt=0, le=3_600, validation_alias="KEYROTOR_FAILOVER_RETRY_SECONDS"
    )
    # Longest wait for the primary on a DEK cache miss before a secondary is asked.
    failover_timeout_s: float = Field(
        default=2.0, gt=0, le=60, validation_alias="KEYROTOR_FAILOVER_TIMEOUT_SECONDS"
    )
    # Connect timeout of a region's database (check, repair and failover reads).
    region_connect_timeout_s: float = Field(
        default=3.0, gt=0, le=60, validation_alias="KEYROTOR_REGION_CONNECT_TIMEOUT_SECONDS"
    )

    # logging
    log_level: str = Field(default="INFO", validation_alias="KEYROTOR_LOG_LEVEL")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias="KEYROTOR_LOG_FORMAT"
    )

    # the audit log and access control (docs/audit.md)
    # `durable`: a call returns once its event is committed (group commit); `on` is its old
    # name. `async`: events queue in memory (a crash loses what is queued). `off` exists for
    # benchmarks only: without the log keyrotor is not compliant.
    audit_mode: Literal["durable", "async", "off"] = Field(
        default="durable", validation_alias="KEYROTOR_AUDIT"
    )
    # async mode: how long a call waits for room in a full queue before its event is dropped
    # (counted and logged); 0 waits as long as it takes.
    audit_put_timeout_s: float = Field(
        default=0.0, ge=0, le=3600, validation_alias="KEYROTOR_AUDIT_PUT_TIMEOUT_SECONDS"
    )
    audit_queue_max: int = Field(default=10_000, ge=1, validation_alias="KEYROTOR_AUDIT_QUEUE_MAX")
    audit_batch_size: int = Field(
        default=1_000, ge=1, le=50_000, validation_alias="KEYROTOR_AUDIT_BATCH_SIZE"
    )
    audit_flush_interval_s: float = Field(
        default=0.5, gt=0, le=60, validation_alias="KEYROTOR_AUDIT_FLUSH_INTERVAL_SECONDS"
    )
    # How long close() keeps retrying to write what is still queued before it gives up loudly.
    audit_close_timeout_s: float = Field(
        default=10.0, ge=0, validation_alias="KEYROTOR_AUDIT_CLOSE_TIMEOUT_SECONDS"
    )
    audit_api_token: SecretStr | None = Field(default=None, validation_alias="KEYROTOR_AUDIT_API_TOKEN")
    # Signed checkpoints of the chain's head (keyrotor.audit.checkpoint): every this many seconds
    # (0: only when a KeyManager closes), and appended to this file when set.
    audit_checkpoint_interval_s: float = Field(
        default=3600.0, ge=0, validation_alias="KEYROTOR_AUDIT_CHECKPOINT_INTERVAL_SECONDS"
    )
    audit_checkpoint_file: str | None = Field(default=None, validation_alias="KEYROTOR_AUDIT_CHECKPOINT_FILE")
    grants_ttl_s: float = Field(default=30.0, ge=0, validation_alias="KEYROTOR_GRANTS_TTL_SECONDS")
    default_actor: str = Field(
        default="system", min_length=1, max_length=200, validation_alias="KEYROTOR_DEFAULT_ACTOR"
    )

    # the HTTP API (`keyrotor serve`, keyrotor.api): where it listens, TLS, which peers may
    # name the client in X-Forwarded-For (comma-separated addresses or CIDRs), and its bounds
    api_host: str = Field(default="127.0.0.1", validation_alias="KEYROTOR_API_HOST")
    api_port: int = Field(default=8180, ge=0, le=65_535, validation_alias="KEYROTOR_API_PORT")
    api_tls_cert: str | None = Field(default=None, validation_alias="KEYROTOR_API_TLS_CERT")
    api_tls_key: str | None = Field(default=None, validation_alias="KEYROTOR_API_TLS_KEY")
    api_trusted_proxies: str = Field(default="", validation_alias="KEYROTOR_API_TRUSTED_PROXIES")
    api_max_body_bytes: int = Field(
        default=1_048_576, ge=1_024, le=64 * 1_048_576, validation_alias="KEYROTOR_API_MAX_BODY_BYTES"
    )
    api_max_batch_items: int = Field(
        default=1_000, ge=1, le=100_000, validation_alias="KEYROTOR_API_MAX_BATCH_ITEMS"
    )
    api_rate_per_second: float = Field(default=2_000.0, ge=0, validation_alias="KEYROTOR_API_RATE_PER_SECOND")
    api_rate_burst: int = Field(default=4_000, ge=1, validation_alias="KEYROTOR_API_RATE_BURST")
    api_token_cache_s: float = Field(
        default=5.0, ge=0, le=300, validation_alias="KEYROTOR_API_TOKEN_CACHE_SECONDS"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _MappingEnvSource(settings_cls, case_sensitive=False))

    @model_validator(mode="before")
    @classmethod
    def _audit_enabled_override(cls, data: Any) -> Any:
        # `audit_enabled=False`, the override's name before the modes, must not be ignored.
        if isinstance(data, dict) and "audit_enabled" in data:
            data = dict(data)
            enabled = data.pop("audit_enabled")
            data.setdefault("audit_mode", "durable" if enabled else "off")
        return data

    @field_validator("audit_mode", mode="before")
    @classmethod
    def _audit_mode(cls, value: Any) -> Any:
        # `on` (and the booleans the variable once took) name the default; `off` and false stay off.
        if isinstance(value, bool):
            return "durable" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return _AUDIT_ALIASES.get(word, word)
        return value

    @property
    def audit_enabled(self) -> bool:
        """Whether KeyManager records its calls (any ``KEYROTOR_AUDIT`` but ``off``)."""
        return self.audit_mode != "off"

    @field_validator("encryption_key", "legacy_encryption_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _default_grace_within_interval(self) -> Settings:
        # The same rule as `keyrotor policy set`: refused, not clamped, so new scopes never get
        # a policy other than the one configured.
        if self.default_grace_days > self.default_interval_days:
            raise ValueError(
                f"KEYROTOR_DEFAULT_GRACE_DAYS ({self.default_grace_days}) cannot be longer than "
                f"KEYROTOR_DEFAULT_INTERVAL_DAYS ({self.default_interval_days})"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``), then apply ``overrides``.

        Raises:
            ConfigurationError: a variable has an invalid value. The message names the
                variable, never its value (it may be a key).
        """
        token = _ENVIRON.set(environ)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None
        except SettingsError as exc:
            # A JSON-valued variable (ENCRYPTION_KEYS_PREVIOUS) that is not JSON: pydantic-settings
            # raises its own error, which must not escape untyped. Its text names the field only.
            field = re.search(r'field "([a-z_]+)"', str(exc))
            raise ConfigurationError(
                f"invalid configuration: {field.group(1) if field else 'settings'}: not valid JSON"
            ) from None
        finally:
            _ENVIRON.reset(token)

    @property
    def legacy_key(self) -> str | None:
        """The master key legacy values were encrypted with."""
        key = self.legacy_encryption_key or self.encryption_key
        return key.get_secret_value() if key else None


def _describe(exc: ValidationError) -> str:
    # pydantic's messages can echo the input; rebuild one from locations and types only.
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
