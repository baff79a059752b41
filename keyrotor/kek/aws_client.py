"""The AWS plumbing shared by the KMS and Secrets Manager providers: where and as whom to call
AWS, the aiobotocore client, and how its errors become keyrotor errors (throttled, transient or
permanent)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    InvalidRegionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url, validate_region_name

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, KeyrotorError
from keyrotor.kek.environ import env_required, env_value
from keyrotor.kek.resilience import Concealed, Throttled, Translator


def check_region(region: str, variable: str) -> None:
    """Refuse a region name botocore would refuse when the client is made (ConfigurationError
    naming ``variable``, instead of botocore's InvalidRegionError at start-up)."""
    try:
        validate_region_name(region)
    except InvalidRegionError:
        raise ConfigurationError(
            f"{variable}: {region!r} is not an AWS region name (e.g. eu-west-1)"
        ) from None


@dataclass(frozen=True)
class AwsConnection:
    """Where and as whom to call AWS: shared by the KMS and Secrets Manager configs.

    Without ``access_key_id``/``secret_access_key`` the default credential chain applies
    (instance profile, web identity, ``~/.aws``).
    """

    region: str
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AwsConnection:
        """Read ``AWS_SECRETS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY``.

        Raises:
            ConfigurationError: the region is not set, or only one of the two credential variables is.
        """
        region = env_required(environ, "AWS_SECRETS_REGION")
        key_id = env_value(environ, "AWS_ACCESS_KEY_ID")
        secret = env_value(environ, "AWS_SECRET_ACCESS_KEY")
        if key_id and not secret:
            raise ConfigurationError("AWS_SECRET_ACCESS_KEY is not set (AWS_ACCESS_KEY_ID is)")
        if secret and not key_id:
            raise ConfigurationError("AWS_ACCESS_KEY_ID is not set (AWS_SECRET_ACCESS_KEY is)")
        check_region(region, "AWS_SECRETS_REGION")
        endpoint_url = env_value(environ, "AWS_ENDPOINT_URL")
        if endpoint_url is not None and not (
            is_valid_endpoint_url(endpoint_url) or is_valid_ipv6_endpoint_url(endpoint_url)
        ):
            raise ConfigurationError(
                "AWS_ENDPOINT_URL is not an http:// or https:// URL with a host "
                "(e.g. https://kms.eu-west-1.amazonaws.com)"
            )
        return cls(
            region=region,
            endpoint_url=endpoint_url,
            access_key_id=key_id,
            secret_access_key=secret,
        )


_THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
    }
)
# LimitExceededException is not here: KMS and Secrets Manager use it for resource quotas
# (on-demand rotations per key, versions per secret), which waiting does not fix.
_TRANSIENT_CODES = frozenset(
    {
        "KMSInternalException",
        "KeyUnavailableException",
        "DependencyTimeoutException",
        "InternalServiceError",
        "InternalServiceErrorException",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)


# The request's credentials were refused: wrong, unknown or expired keys (not a missing permission).
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
    }
)
_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,500})</Message>")


def _client_error_parts(exc: ClientError) -> tuple[str, str]:
    """(code, message) of a ClientError. An endpoint that answers a JSON-protocol call with an
    XML error body (moto, some proxies) leaves botocore with the HTTP status as the code and the
    XML as the message: the real code and message are taken from the XML."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "UnknownError")
    message = str(error.get("Message") or "").strip()
    inner = _XML_CODE.search(message)
    if inner is not None:
        code = inner.group(1).strip()
        found = _XML_MESSAGE.search(message)
        message = found.group(1).strip() if found else ""
    return code, message


def aws_error_code(err: BaseException) -> str | None:
    """The AWS error code behind a keyrotor error (its ``__cause__``) or a ClientError, if any."""
    exc: BaseException | None = err
    while exc is not None:
        if isinstance(exc, ClientError):
            code, _ = _client_error_parts(exc)
            return None if code == "UnknownError" else code
        exc = exc.__cause__
    return None


def aws_translator(target: str) -> Translator:
    """Translate botocore/aiohttp exceptions of the client behind ``target`` into keyrotor errors."""

    def translate(exc: BaseException, operation: str) -> KeyrotorError | Concealed | None:
        if isinstance(exc, ClientError):
            code, detail = _client_error_parts(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _CREDENTIAL_CODES:
                # Not the detail: a signature error's explains the string to sign.
                return KekError(
                    f"{target} {operation}: {code}: AWS refused the credentials (wrong, unknown or "
                    "expired: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the role)"
                )
            text = f"{target} {operation}: {code}" + (f" ({detail})" if detail else "")
            if code in _THROTTLING_CODES or status == 429:
                return Throttled(text)
            if code in _TRANSIENT_CODES or status >= 500:
                return KekUnavailable(text)
            return KekError(text)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return ConfigurationError(
                f"{target}: no AWS credentials "
                "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use a role)"
            )
        if isinstance(exc, ParamValidationError):
            # botocore's text quotes the value of a parameter of the wrong type (a DEK given as
            # a list of ints, say): name only the cause, and do not chain to it.
            return Concealed(
                KekError(f"{target} {operation}: the request failed botocore's parameter validation")
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, ConnectionError)):
            return KekUnavailable(
                f"{target} {operation}: cannot reach the endpoint ({type(exc).__name__}: {exc})"
            )
        if isinstance(exc, BotoCoreError):
            return KekUnavailable(f"{target} {operation}: {type(exc).__name__}: {exc}")
        return None

    return translate


async def open_aws_client(
    stack: AsyncExitStack, service: str, connection: AwsConnection, *, region: str, timeout_s: float
) -> Any:
    """Create an aiobotocore client whose lifetime ``stack`` owns.

    Retries are off in botocore (``total_max_attempts=1``): :class:`Resilience` does them, with
    its circuit breaker and metrics. Returns ``Any``: aiobotocore ships no type hints
    (types-aiobotocore would give them; it is not a dependency).
    """
    config = AioConfig(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    session = get_session()
    creator = session.create_client(
        service,
        region_name=region,
        endpoint_url=connection.endpoint_url,
        aws_access_key_id=connection.access_key_id,
        aws_secret_access_key=connection.secret_access_key,
        config=config,
    )
    client: Any = await stack.enter_async_context(creator)
    return client
