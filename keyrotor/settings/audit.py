"""The audit log and access control (docs/audit.md): how KeyManager records its calls, and who
may make them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from keyrotor.settings.base import SettingsPart

# KEYROTOR_AUDIT accepts boolean spellings too, so deployments that set it to a boolean keep
# their meaning: "on" spellings are the default mode, "off" spellings turn the log off.
_AUDIT_ALIASES = {w: "durable" for w in ("on", "true", "1", "yes")} | {w: "off" for w in ("false", "0", "no")}


class AuditSettings(SettingsPart):
    """The audit log's mode, queue and checkpoints; the grants' cache and the default actor."""

    # `durable`: a call returns once its event is committed (group commit); `on` is the same.
    # `async`: events queue in memory (a crash loses what is queued). `off` exists for
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
    # Bearer token of `keyrotor audit serve` (keyrotor.worker.audit_api).
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

    @model_validator(mode="before")
    @classmethod
    def _audit_enabled_override(cls, data: Any) -> Any:
        # Code that configures with `audit_enabled=False` means "off": it must not be ignored.
        if isinstance(data, dict) and "audit_enabled" in data:
            data = dict(data)
            enabled = data.pop("audit_enabled")
            data.setdefault("audit_mode", "durable" if enabled else "off")
        return data

    @field_validator("audit_mode", mode="before")
    @classmethod
    def _audit_mode(cls, value: Any) -> Any:
        # `on` (and the boolean spellings) name the default; `off` and false stay off.
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
