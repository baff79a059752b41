"""Open a remote KEK provider from environment variables: ``aws`` (KMS or Secrets Manager) or ``vault``."""

from __future__ import annotations

from collections.abc import Mapping

from keyrotor.errors import ConfigurationError
from keyrotor.kek.aws_kms import AwsKmsConfig, AwsKmsKek
from keyrotor.kek.aws_secrets import AwsSecretsConfig, AwsSecretsKek
from keyrotor.kek.base import KekProvider
from keyrotor.kek.environ import env_value
from keyrotor.kek.metrics import CallObserver
from keyrotor.kek.resilience import CallBudget, ResiliencePolicy
from keyrotor.kek.vault import VaultTransitKek
from keyrotor.kek.vault_client import VaultConfig

KINDS = ("aws", "vault")


async def open_remote_provider(
    kind: str,
    environ: Mapping[str, str],
    *,
    policy: ResiliencePolicy | None = None,
    limiter: CallBudget | None = None,
    observer: CallObserver | None = None,
) -> KekProvider:
    """Open and check the remote KEK provider ``kind`` configured in ``environ``.

    ``aws`` is KMS mode when ``AWS_KMS_KEY_ID`` is set and Secrets Manager mode when
    ``AWS_SECRET_ID`` is; ``vault`` is a Vault/OpenBao transit key.

    Args:
        kind: ``aws`` or ``vault``.
        environ: the variables (usually ``os.environ``).
        policy: timeouts, retries, circuit breaker and rate budget (default :class:`ResiliencePolicy`).
        limiter: a rate budget shared with other providers of the same quota.
        observer: metrics hooks (default: Prometheus).

    Returns:
        The open provider; the caller owns it and must ``await provider.aclose()``.

    Raises:
        ConfigurationError: unknown ``kind``, a required variable is missing (named in the
            message), or both or neither of ``AWS_KMS_KEY_ID`` and ``AWS_SECRET_ID`` are set.
        KekError: the provider refused (missing key or secret, access denied).
        KekUnavailable: the provider cannot be reached.
    """
    if kind == "vault":
        return await VaultTransitKek.open(
            VaultConfig.from_env(environ), policy=policy, limiter=limiter, observer=observer
        )
    if kind == "aws":
        kms_key, secret = env_value(environ, "AWS_KMS_KEY_ID"), env_value(environ, "AWS_SECRET_ID")
        if kms_key and secret:
            raise ConfigurationError(
                "AWS_KMS_KEY_ID and AWS_SECRET_ID are both set: set AWS_KMS_KEY_ID for KMS mode "
                "or AWS_SECRET_ID for Secrets Manager mode, not both"
            )
        if kms_key:
            return await AwsKmsKek.open(
                AwsKmsConfig.from_env(environ), policy=policy, limiter=limiter, observer=observer
            )
        if secret:
            return await AwsSecretsKek.open(
                AwsSecretsConfig.from_env(environ), policy=policy, limiter=limiter, observer=observer
            )
        raise ConfigurationError(
            "AWS_KMS_KEY_ID is not set (nor AWS_SECRET_ID): the aws provider needs one of them"
        )
    raise ConfigurationError(f"unknown remote KEK provider {kind!r} (expected one of: {', '.join(KINDS)})")
