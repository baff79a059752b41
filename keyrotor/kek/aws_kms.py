"""The AWS KMS KEK provider (aiobotocore), and the AWS plumbing shared with Secrets Manager mode.

The KEK is a symmetric KMS key (``AWS_KMS_KEY_ID``: key id, ARN or alias); its key material
never leaves KMS:

- ``wrap`` = ``Encrypt``, ``unwrap`` = ``Decrypt`` (with ``KeyId``, so a blob of another key is
  refused), ``rewrap`` = ``ReEncrypt`` (server side: the DEK never leaves KMS), each with the
  ``EncryptionContext`` of :meth:`WrapContext.as_encryption_context`, so a wrapped DEK copied to
  another scope or DEK version does not unwrap.
- ``kek_id`` is the key ARN (resolved with ``DescribeKey`` at start-up).
- KEK versions. KMS keeps every generation of key material of a key and picks the right one
  from the ciphertext by itself, but it does not number them, and ``Encrypt`` does not say which
  material it used. keyrotor numbers them honestly from the key's own history:
  version = 1 + the number of completed rotations listed by ``ListKeyRotations`` (automatic and
  on-demand). ``rotate()`` calls ``RotateKeyOnDemand`` (which only *starts* a rotation) and waits
  until ``ListKeyRotations`` shows it completed. A wrap records the version it read before
  calling ``Encrypt`` (cached for ``version_ttl_s``); if another process rotated meanwhile, the
  DEK is recorded one version too low, and ``rotate_kek`` merely rewraps it once more — never
  the other way round, because the count only grows.
- AWS limits on-demand rotations per key (10, later raised to 25); past that ``rotate()`` fails
  with KekError (``LimitExceededException``). Keys with automatic rotation still rotate.

moto (server mode) implements ``RotateKeyOnDemand`` and ``ListKeyRotations`` as bookkeeping
only: it records the rotation but keeps one key material, so under moto a rotation changes the
version numbers but not the ciphertexts' key. ``GetKeyRotationStatus`` under moto omits
``OnDemandRotationStartDate``, which is then treated as "no rotation in progress".
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiolimiter import AsyncLimiter
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, KeyrotorError
from keyrotor.kek.base import WrapContext, WrappedDek, foreign_kek
from keyrotor.kek.metrics import CallObserver
from keyrotor.kek.resilience import Resilience, ResiliencePolicy, Throttled, Translator

DEK_BYTES = 32
_PROBE_CONTEXT = WrapContext("keyrotor/health", 1)

# --- environment ---------------------------------------------------------------------------


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None if it is unset or blank."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def env_required(environ: Mapping[str, str], name: str, why: str = "") -> str:
    """The variable's value; ConfigurationError naming it if it is unset or blank."""
    value = env_value(environ, name)
    if value is None:
        raise ConfigurationError(f"{name} is not set{why}")
    return value


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
        return cls(
            region=region,
            endpoint_url=env_value(environ, "AWS_ENDPOINT_URL"),
            access_key_id=key_id,
            secret_access_key=secret,
        )


# --- clients and errors ----------------------------------------------------------------------

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

    def translate(exc: BaseException, operation: str) -> KeyrotorError | None:
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
            # botocore's text can quote parameter values, i.e. key material: name only the cause.
            return KekError(f"{target} {operation}: the request failed botocore's parameter validation")
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


def check_dek(provider: str, dek: bytes) -> None:
    """Refuse to wrap anything but a 32-byte DEK (KekError)."""
    if len(dek) != DEK_BYTES:
        raise KekError(f"{provider}: refusing to wrap a DEK of {len(dek)} bytes (need {DEK_BYTES})")


# --- KMS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsKmsConfig:
    """Configuration of the KMS provider.

    ``key_id`` may be a key id, key ARN, alias name (``alias/keyrotor``) or alias ARN.
    """

    connection: AwsConnection
    key_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AwsKmsConfig:
        """Read ``AWS_KMS_KEY_ID`` and the :class:`AwsConnection` variables.

        Raises:
            ConfigurationError: naming the missing variable.
        """
        key_id = env_required(environ, "AWS_KMS_KEY_ID")
        return cls(connection=AwsConnection.from_env(environ), key_id=key_id)


class AwsKmsKek:
    """KEK provider backed by a symmetric AWS KMS key. Build it with :meth:`open`."""

    def __init__(
        self,
        *,
        config: AwsKmsConfig,
        client: Any,
        key_arn: str,
        resilience: Resilience,
        stack: AsyncExitStack,
        version_ttl_s: float,
        rotate_timeout_s: float,
        rewrap_concurrency: int,
    ) -> None:
        self.config = config
        self._client = client
        self._key_arn = key_arn
        self.resilience = resilience
        self._stack = stack
        self._version_ttl_s = version_ttl_s
        self._rotate_timeout_s = rotate_timeout_s
        self._rewrap_concurrency = rewrap_concurrency
        self._version = 0
        self._version_read_at = float("-inf")

    @classmethod
    async def open(
        cls,
        config: AwsKmsConfig,
        *,
        policy: ResiliencePolicy | None = None,
        limiter: AsyncLimiter | None = None,
        observer: CallObserver | None = None,
        version_ttl_s: float = 60.0,
        rotate_timeout_s: float = 600.0,
        rewrap_concurrency: int = 8,
    ) -> AwsKmsKek:
        """Connect, resolve the key's ARN and check that it can encrypt.

        Args:
            config: region, endpoint, credentials and key id.
            policy: timeouts, retries, breaker and rate budget (default :class:`ResiliencePolicy`).
            limiter: a rate budget shared with other providers of the same account and region.
            observer: metrics hooks.
            version_ttl_s: how long the KEK version (a ``ListKeyRotations`` count) is cached.
            rotate_timeout_s: how long :meth:`rotate` waits for KMS to complete a rotation.
            rewrap_concurrency: ``ReEncrypt`` requests in flight at once in :meth:`rewrap`.

        Raises:
            KekError: the key does not exist, is disabled or pending deletion, or access is denied.
            ConfigurationError: the key is not a symmetric encryption key.
            KekUnavailable: KMS cannot be reached.
        """
        policy = policy or ResiliencePolicy()
        target = f"aws-kms ({config.connection.region})"
        stack = AsyncExitStack()
        try:
            client = await open_aws_client(
                stack, "kms", config.connection, region=config.connection.region, timeout_s=policy.timeout_s
            )
            resilience = Resilience(
                "aws-kms", policy, aws_translator(target), target=target, limiter=limiter, observer=observer
            )
            described = await resilience.call(
                "describe_key", partial(client.describe_key, KeyId=config.key_id)
            )
            meta: Mapping[str, Any] = described["KeyMetadata"]
            arn = str(meta["Arn"])
            state = meta.get("KeyState", "Enabled" if meta.get("Enabled", True) else "Disabled")
            if state != "Enabled":
                raise KekError(f"{target}: key {arn} is {state}, not Enabled")
            spec = meta.get("KeySpec", "SYMMETRIC_DEFAULT")
            usage = meta.get("KeyUsage", "ENCRYPT_DECRYPT")
            if spec != "SYMMETRIC_DEFAULT" or usage != "ENCRYPT_DECRYPT":
                raise ConfigurationError(
                    f"{target}: key {arn} is {spec}/{usage}; AWS_KMS_KEY_ID must name a symmetric "
                    "encryption key (SYMMETRIC_DEFAULT/ENCRYPT_DECRYPT)"
                )
            provider = cls(
                config=config,
                client=client,
                key_arn=arn,
                resilience=resilience,
                stack=stack,
                version_ttl_s=version_ttl_s,
                rotate_timeout_s=rotate_timeout_s,
                rewrap_concurrency=rewrap_concurrency,
            )
            await provider.current_version()
            return provider
        except BaseException:
            await stack.aclose()
            raise

    @property
    def name(self) -> str:
        return "aws-kms"

    @property
    def kek_id(self) -> str:
        """The KMS key ARN."""
        return self._key_arn

    async def _call(self, operation: str, request: partial[Any], *, retry: bool = True) -> Any:
        return await self.resilience.call(operation, request, retry=retry)

    async def _count_rotations(self) -> int:
        count = 0
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"KeyId": self._key_arn}
            if marker:
                kwargs["Marker"] = marker
            page = await self._call("list_key_rotations", partial(self._client.list_key_rotations, **kwargs))
            count += len(page.get("Rotations", []))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                return count

    def _remember_version(self, version: int) -> int:
        # max(): the rotation count only grows; an eventually consistent read must not go back.
        self._version = max(self._version, version)
        self._version_read_at = asyncio.get_running_loop().time()
        return self._version

    async def current_version(self) -> int:
        """1 + the number of completed rotations of the key (cached for ``version_ttl_s``)."""
        if asyncio.get_running_loop().time() - self._version_read_at < self._version_ttl_s:
            return self._version
        return self._remember_version(1 + await self._count_rotations())

    def _check_response_key(self, key_id: object, operation: str, context: WrapContext) -> None:
        if key_id is not None and key_id not in (self._key_arn, self._key_arn.rsplit("/", 1)[-1]):
            raise KekError(
                f"aws-kms {operation}: the DEK for {context.scope} v{context.dek_version} belongs to "
                f"key {key_id}, not {self._key_arn}"
            )

    def _check_kek_id(self, wrapped: WrappedDek) -> None:
        foreign = foreign_kek("aws-kms", self._key_arn, wrapped)
        if foreign is not None:
            raise foreign
        if wrapped.kek_id != self._key_arn:
            raise KekError(
                f"aws-kms: DEK was wrapped by {wrapped.kek_id}, this provider uses {self._key_arn} "
                "(AWS_KMS_KEY_ID names another key)"
            )

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        check_dek("aws-kms", dek)
        version = await self.current_version()
        response = await self._call(
            "encrypt",
            partial(
                self._client.encrypt,
                KeyId=self._key_arn,
                Plaintext=dek,
                EncryptionContext=context.as_encryption_context(),
            ),
        )
        return WrappedDek(kek_id=self._key_arn, kek_version=version, blob=bytes(response["CiphertextBlob"]))

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        self._check_kek_id(wrapped)
        try:
            response = await self._call(
                "decrypt",
                partial(
                    self._client.decrypt,
                    CiphertextBlob=wrapped.blob,
                    KeyId=self._key_arn,
                    EncryptionContext=context.as_encryption_context(),
                ),
            )
        except KekError as err:
            raise KekError(
                f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} does not unwrap "
                f"(wrapped for another scope or version, another key, or tampered): {err}"
            ) from err
        self._check_response_key(response.get("KeyId"), "unwrap", context)
        dek = bytes(response["Plaintext"])
        if len(dek) != DEK_BYTES:
            raise KekError(f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} is not a DEK")
        return dek

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        """``ReEncrypt`` each DEK under the key's current material, in order, server side."""
        for wrapped, _ in items:
            self._check_kek_id(wrapped)
        if not items:
            return []
        version = await self.current_version()
        limit = asyncio.Semaphore(self._rewrap_concurrency)

        async def one(wrapped: WrappedDek, context: WrapContext) -> WrappedDek:
            ec = context.as_encryption_context()
            request = partial(
                self._client.re_encrypt,
                CiphertextBlob=wrapped.blob,
                SourceKeyId=self._key_arn,
                SourceEncryptionContext=ec,
                DestinationKeyId=self._key_arn,
                DestinationEncryptionContext=ec,
            )
            async with limit:
                try:
                    response = await self._call("rewrap", request)
                except KekError as err:
                    raise KekError(
                        f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} "
                        f"does not rewrap: {err}"
                    ) from err
            # KMS refuses a SourceKeyId that does not match the blob; check it here too (moto
            # does not), so a DEK of another key is never adopted by a rewrap.
            self._check_response_key(response.get("SourceKeyId"), "rewrap", context)
            self._check_response_key(response.get("KeyId"), "rewrap", context)
            return WrappedDek(
                kek_id=self._key_arn, kek_version=version, blob=bytes(response["CiphertextBlob"])
            )

        # gather, not a TaskGroup: callers get the KekError itself, not an ExceptionGroup.
        tasks = [asyncio.ensure_future(one(wrapped, context)) for wrapped, context in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def rotate(self) -> int:
        """Rotate the key material on demand, wait until KMS completes it, return the new version.

        If a rotation is already in progress (another process, or an interrupted run), it waits
        for that one instead of starting a second.

        Raises:
            KekError: on-demand rotations are exhausted for this key, or access is denied.
            KekUnavailable: KMS cannot be reached, or the rotation did not complete within
                ``rotate_timeout_s`` (call again later: it waits for the same rotation).
        """
        before = await self._count_rotations()
        if not await self._rotation_in_progress():
            try:
                await self._call(
                    "rotate", partial(self._client.rotate_key_on_demand, KeyId=self._key_arn), retry=False
                )
            except KekError as err:
                if aws_error_code(err) != "ConflictException":  # a rotation started meanwhile: wait for it
                    raise
            except KekUnavailable:
                # Not retried (it would rotate twice). The request may still have been carried
                # out: wait for it only if KMS shows it, else let the caller retry.
                if not (await self._rotation_in_progress() or await self._count_rotations() > before):
                    raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._rotate_timeout_s
        delay = 0.05
        while True:
            count = await self._count_rotations()
            if count > before:
                version = self._remember_version(1 + count)
                return version
            if loop.time() >= deadline:
                raise KekUnavailable(
                    f"aws-kms: rotation of {self._key_arn} has not completed "
                    f"after {self._rotate_timeout_s:g}s; "
                    "call rotate() again to keep waiting for it"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _rotation_in_progress(self) -> bool:
        status = await self._call(
            "get_key_rotation_status", partial(self._client.get_key_rotation_status, KeyId=self._key_arn)
        )
        return bool(status.get("OnDemandRotationStartDate"))

    async def check(self) -> None:
        """Round-trip a random probe DEK through Encrypt and Decrypt."""
        probe = os.urandom(DEK_BYTES)
        if await self.unwrap(await self.wrap(probe, _PROBE_CONTEXT), _PROBE_CONTEXT) != probe:
            raise KekError(f"aws-kms: key {self._key_arn} failed its round trip")

    async def aclose(self) -> None:
        await self._stack.aclose()
