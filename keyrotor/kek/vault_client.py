"""The Vault/OpenBao wire client: configuration, the token kept valid, and errors translated.

Authentication: ``VAULT_TOKEN``, or AppRole (``VAULT_ROLE_ID`` + ``VAULT_SECRET_ID``, which wins
if both are set). Before each request the token is renewed once less than half of its TTL is
left; when it cannot be renewed any more (max TTL reached, or revoked) an AppRole login is
repeated. A static token that expires cannot be replaced: requests then fail with KekError
(permission denied). ``VAULT_NAMESPACE`` sets the namespace (OpenBao has namespaces since 2.3).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hvac
import hvac.exceptions as hv
import requests  # type: ignore[import-untyped, unused-ignore]

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, KeyrotorError
from keyrotor.kek.environ import env_required, env_value
from keyrotor.kek.resilience import Throttled, Translator


def shown_address(addr: str) -> str:
    """``VAULT_ADDR`` as errors and health output show it: without any ``user:password@`` part."""
    parts = urlsplit(addr)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)) if host else addr


def check_vault_addr(addr: str) -> None:
    """Refuse a ``VAULT_ADDR`` that is not an ``http(s)://host[:port]`` URL (ConfigurationError).

    Without this, a missing scheme or a bad port reaches requests, whose refusal reads as a
    transient "cannot reach the server" that is retried forever, and an unparseable URL is a
    bare ValueError. The message never shows the value: it may hold ``user:password@``.
    """
    try:
        parts = urlsplit(addr)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            "VAULT_ADDR is not an http:// or https:// URL with a host (e.g. https://vault.internal:8200)"
        )


@dataclass(frozen=True)
class VaultConfig:
    """Configuration of the transit provider.

    ``mount_point`` (transit engine path), ``approle_mount`` and ``verify_tls`` are not read from
    the environment.
    """

    addr: str
    transit_key: str = "keyrotor"
    namespace: str | None = None
    token: str | None = field(default=None, repr=False)
    role_id: str | None = field(default=None, repr=False)
    secret_id: str | None = field(default=None, repr=False)
    mount_point: str = "transit"
    approle_mount: str = "approle"
    verify_tls: bool | str = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> VaultConfig:
        """Read ``VAULT_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_TOKEN`` or ``VAULT_ROLE_ID`` +
        ``VAULT_SECRET_ID``, and ``VAULT_TRANSIT_KEY``.

        Raises:
            ConfigurationError: naming the missing variable.
        """
        addr = env_required(environ, "VAULT_ADDR")
        token = env_value(environ, "VAULT_TOKEN")
        role_id = env_value(environ, "VAULT_ROLE_ID")
        secret_id = env_value(environ, "VAULT_SECRET_ID")
        if role_id and not secret_id:
            raise ConfigurationError("VAULT_SECRET_ID is not set (VAULT_ROLE_ID is)")
        if secret_id and not role_id:
            raise ConfigurationError("VAULT_ROLE_ID is not set (VAULT_SECRET_ID is)")
        if not token and not role_id:
            raise ConfigurationError(
                "VAULT_TOKEN is not set (nor VAULT_ROLE_ID and VAULT_SECRET_ID for AppRole)"
            )
        check_vault_addr(addr)
        return cls(
            addr=addr.rstrip("/"),
            transit_key=env_value(environ, "VAULT_TRANSIT_KEY") or "keyrotor",
            namespace=env_value(environ, "VAULT_NAMESPACE"),
            token=None if role_id else token,
            role_id=role_id,
            secret_id=secret_id,
        )

    @property
    def uses_approle(self) -> bool:
        return self.role_id is not None


def vault_translator(target: str) -> Translator:
    """Translate hvac/requests exceptions of the client behind ``target`` into keyrotor errors."""

    def translate(exc: BaseException, operation: str) -> KeyrotorError | None:
        if isinstance(exc, hv.VaultError):
            cause = (
                "; ".join(str(e) for e in exc.errors)
                if isinstance(exc.errors, list)
                else str(exc.errors or "")
            )
            cause = " ".join(cause.split())  # OpenBao's "1 error occurred:\n\t* ..." on one line
            text = f"{target} {operation}: {type(exc).__name__}" + (f" ({cause})" if cause else "")
            if isinstance(exc, hv.RateLimitExceeded):
                return Throttled(text)
            if isinstance(
                exc,
                (
                    hv.InternalServerError,
                    hv.VaultDown,
                    hv.BadGateway,
                    hv.PreconditionFailed,
                    hv.UnexpectedError,
                ),
            ):
                return KekUnavailable(text)
            if isinstance(exc, (hv.Forbidden, hv.Unauthorized)):
                return KekError(f"{text}: the token lacks permission, or has expired or been revoked")
            return KekError(text)
        if isinstance(exc, (requests.exceptions.RequestException, ConnectionError)):
            return KekUnavailable(f"{target} {operation}: cannot reach the server ({type(exc).__name__})")
        return None

    return translate


class TokenKeeper:
    """Keeps the client's token valid: renew at half-life, AppRole login again when that fails.

    ``ttl_s`` is the token's full TTL (at login, or its creation TTL) and sets the cadence: once
    less than half of it is left, the next request first renews the token. A renewal capped by
    the token's max TTL to less than half a TTL means the token is near its end: an AppRole
    logs in afresh; a static token keeps what it got and is not renewed again.
    Runs in the worker threads, under a lock.
    """

    def __init__(self, client: hvac.Client, config: VaultConfig, clock: Callable[[], float]) -> None:
        self._client = client
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self.expires_at: float | None = None  # monotonic; None: never expires
        self.ttl_s = 0.0
        self.renewable = False
        self.accessor: str | None = None
        self.renewals = 0
        self.logins = 0

    def start(self) -> None:
        with self._lock:
            if self._config.uses_approle:
                self._login()
                return
            self._client.token = self._config.token or ""
            data = response_data(self._client.auth.token.lookup_self())
            remaining = int(data.get("ttl") or 0)
            self.ttl_s = float(data.get("creation_ttl") or remaining)
            self.expires_at = self._clock() + remaining if remaining > 0 else None
            self.renewable = bool(data.get("renewable"))
            self.accessor = str(data.get("accessor") or "") or None

    def _login(self) -> None:
        auth = self._client.auth.approle.login(
            self._config.role_id, self._config.secret_id, mount_point=self._config.approle_mount
        )["auth"]
        lease = int(auth.get("lease_duration") or 0)
        self.ttl_s = float(lease)
        self.expires_at = self._clock() + lease if lease > 0 else None
        self.renewable = bool(auth.get("renewable"))
        self.accessor = str(auth.get("accessor") or "") or None
        self.logins += 1

    def relogin(self) -> bool:
        """Log in again after a permission error; False if there is no AppRole to do it with."""
        if not self._config.uses_approle:
            return False
        with self._lock:
            self._login()
        return True

    def ensure(self) -> None:
        if self.expires_at is None:
            return
        with self._lock:
            now = self._clock()
            if self.expires_at is None or self.expires_at - now > self.ttl_s / 2:
                return
            if self.renewable and self.expires_at > now:
                try:
                    auth = self._client.auth.token.renew_self()["auth"]
                except hv.VaultError:
                    # Revoked, or past its max TTL (OpenBao answers that with a 500 "past the max
                    # TTL, cannot renew"). Connection errors are not VaultErrors: they propagate.
                    auth = None
                    self.renewable = False
                if auth is not None:
                    granted = int(auth.get("lease_duration") or 0)
                    self.renewals += 1
                    if granted > self.ttl_s / 2 or not self._config.uses_approle:
                        self.expires_at = now + granted
                        self.renewable = bool(auth.get("renewable")) and granted > self.ttl_s / 2
                        return
            if self._config.uses_approle:
                self._login()


def response_data(response: Any) -> dict[str, Any]:
    """The ``data`` object of a response; KekError if it has none."""
    data = response["data"]
    if not isinstance(data, dict):
        raise KekError("vault: unexpected response (no data object)")
    return data
