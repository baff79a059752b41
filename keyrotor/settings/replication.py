"""Multi-region KEK replication (docs/replication.md): the regions, repair and failover.

Secondaries are ``name=database_url`` pairs, comma-separated; each region's wrapping key comes
from ``KEYROTOR_REGION_<NAME>__*`` variables (the same names as the primary's provider
settings, prefixed), read by :mod:`keyrotor.replication.regions`.
"""

from __future__ import annotations

from pydantic import Field

from keyrotor.settings.base import SettingsPart


class ReplicationSettings(SettingsPart):
    """This deployment's region, its secondaries, and how reads fail over to them."""

    primary_region: str = Field(
        default="primary", min_length=1, max_length=63, validation_alias="KEYROTOR_PRIMARY_REGION"
    )
    # The secondaries' URLs may carry passwords: kept out of repr.
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
    # Longest wait for one statement in a region's database. A connection that stays open while
    # its network drops every packet would otherwise hold a check for as long as TCP takes to
    # give up (hours): the region is graded unreachable instead.
    region_statement_timeout_s: float = Field(
        default=30.0, gt=0, le=600, validation_alias="KEYROTOR_REGION_STATEMENT_TIMEOUT_SECONDS"
    )
