"""The regions of the KEK secret: a client per region, and reads that fail over between them.

Reads go to the primary region first, then to each failover region in order (replicas made with
Secrets Manager replication) when the previous one is unavailable. Only transient errors fail
over: access denied is not fixed by another region. Each region has its own circuit breaker.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog

from keyrotor.errors import KekUnavailable
from keyrotor.kek.aws_client import AwsConnection, aws_translator, open_aws_client
from keyrotor.kek.metrics import CallObserver
from keyrotor.kek.resilience import CallBudget, Resilience, ResiliencePolicy

log = structlog.get_logger("keyrotor.kek.aws_secrets")


@dataclass
class SecretRegion:
    """The secret in one region: its client, its id there, and the region's resilience."""

    name: str
    client: Any
    secret_id: str
    resilience: Resilience

    async def call(self, operation: str, method: str, **kwargs: Any) -> Any:
        """Call the client's ``method`` on the secret, through the region's resilience."""
        request = partial(getattr(self.client, method), SecretId=self.secret_id, **kwargs)
        return await self.resilience.call(operation, request)

    async def get(self, **selector: str) -> Mapping[str, Any]:
        """``GetSecretValue`` of the version ``selector`` names (``VersionStage`` or ``VersionId``)."""
        request = partial(self.client.get_secret_value, SecretId=self.secret_id, **selector)
        response: Mapping[str, Any] = await self.resilience.call("get_secret_value", request)
        return response


def secret_id_in(secret_id: str, region: str) -> str:
    """The secret's id in ``region``: a replica has the primary's name; an ARN differs only in
    its region field."""
    if secret_id.startswith("arn:"):
        parts = secret_id.split(":", 6)
        if len(parts) == 7:
            parts[3] = region
            return ":".join(parts)
    return secret_id


async def open_regions(
    stack: AsyncExitStack,
    connection: AwsConnection,
    secret_id: str,
    regions: tuple[str, ...],
    endpoint_urls: Mapping[str, str],
    *,
    policy: ResiliencePolicy,
    limiter: CallBudget | None,
    observer: CallObserver,
) -> list[SecretRegion]:
    """A client per region (primary first), whose lifetimes ``stack`` owns."""
    out: list[SecretRegion] = []
    for name in regions:
        regional = AwsConnection(
            region=name,
            endpoint_url=endpoint_urls.get(name, connection.endpoint_url),
            access_key_id=connection.access_key_id,
            secret_access_key=connection.secret_access_key,
        )
        client = await open_aws_client(
            stack, "secretsmanager", regional, region=name, timeout_s=policy.timeout_s
        )
        target = f"aws-sm ({name})"
        resilience = Resilience(
            "aws-sm", policy, aws_translator(target), target=target, limiter=limiter, observer=observer
        )
        out.append(SecretRegion(name, client, secret_id_in(secret_id, name), resilience))
    return out


async def read_first(
    regions: list[SecretRegion], observer: CallObserver, secret_id: str, where: str, **selector: str
) -> Mapping[str, Any]:
    """``GetSecretValue`` from the first region that answers (failover on transient errors only).

    Raises:
        KekUnavailable: no region answered.
        KekError: a region refused (not found, access denied): no failover.
    """
    failures: list[str] = []
    last: KekUnavailable | None = None
    for index, region in enumerate(regions):
        try:
            response = await region.get(**selector)
        except KekUnavailable as err:
            failures.append(region.name)
            last = err
            continue
        if index:
            observer.failed_over("aws-sm", "get_secret_value")
            log.warning(
                "kek_failover", provider="aws-sm", region=region.name, unavailable=failures, read=where
            )
        return response
    raise KekUnavailable(
        f"aws-sm: secret {secret_id} is unavailable in every region ({', '.join(failures)}): {last}"
    ) from last
