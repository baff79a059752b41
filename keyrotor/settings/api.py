"""The HTTP API (``keyrotor serve``, keyrotor.api): where it listens, TLS, which peers may name
the client, and the bounds every request meets."""

from __future__ import annotations

from pydantic import Field

from keyrotor.settings.base import SettingsPart


class ApiSettings(SettingsPart):
    """One ``keyrotor serve`` process: its address, TLS, trusted proxies and per-token limits."""

    api_host: str = Field(default="127.0.0.1", validation_alias="KEYROTOR_API_HOST")
    api_port: int = Field(default=8180, ge=0, le=65_535, validation_alias="KEYROTOR_API_PORT")
    # PEM certificate chain and key: both set serves HTTPS.
    api_tls_cert: str | None = Field(default=None, validation_alias="KEYROTOR_API_TLS_CERT")
    api_tls_key: str | None = Field(default=None, validation_alias="KEYROTOR_API_TLS_KEY")
    # Comma-separated addresses or CIDRs whose X-Forwarded-For names the client. Empty: the
    # header is ignored, so a caller cannot choose the address its calls are audited under.
    api_trusted_proxies: str = Field(default="", validation_alias="KEYROTOR_API_TRUSTED_PROXIES")
    api_max_body_bytes: int = Field(
        default=1_048_576, ge=1_024, le=64 * 1_048_576, validation_alias="KEYROTOR_API_MAX_BODY_BYTES"
    )
    api_max_batch_items: int = Field(
        default=1_000, ge=1, le=100_000, validation_alias="KEYROTOR_API_MAX_BATCH_ITEMS"
    )
    # Values a second (a batch counts each item) and burst, per token and per process; 0: no limit.
    api_rate_per_second: float = Field(default=2_000.0, ge=0, validation_alias="KEYROTOR_API_RATE_PER_SECOND")
    api_rate_burst: int = Field(default=4_000, ge=1, validation_alias="KEYROTOR_API_RATE_BURST")
    # How long a process trusts a token lookup: a revoked token stops working within this time.
    api_token_cache_s: float = Field(
        default=5.0, ge=0, le=300, validation_alias="KEYROTOR_API_TOKEN_CACHE_SECONDS"
    )
