"""The census as operators see it: every recorded location, how it is covered, and acknowledgements.

:mod:`keyrotor.census.locations` says what a location is and whether the census covers it; this module
reads ``key_locations`` for ``keyrotor columns list``, ``status``, ``health`` and the
``keyrotor_unregistered_locations`` gauge, and writes ``location_acks`` for
``keyrotor columns ignore|unignore`` (each change a ``config_change`` audit event in the same
transaction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit.log import record_config_change
from keyrotor.census.locations import (
    EVERY_SCOPE,
    NO_CONTEXT,
    SECOND_PHASE_PREFIX,
    UNRECORDED,
    UNREGISTERED,
    acknowledged_locations,
    classify,
    display,
    registered_covers,
)
from keyrotor.errors import InvalidInput, NotFound
from keyrotor.inputs import check_scope
from keyrotor.store import census as store

MAX_LOCATION_CHARS = 1024  # an encrypt context is at most 1024 characters (KeyManager)
MAX_REASON_CHARS = 500
_COLUMN_LIKE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}")


@dataclass(frozen=True)
class VersionUse:
    """Values of one DEK version sealed for a location."""

    version: int
    state: str | None  # None: the data_keys row is not visible (another role's view, or gone)
    encryptions: int
    first_seen: datetime
    last_seen: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "encryptions": self.encryptions,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
        }


@dataclass
class LocationView:
    """One location of one scope: how the census covers it, and the versions sealed there."""

    scope: str
    location: str
    coverage: str  # keyrotor | registered | acknowledged | unregistered (keyrotor.census.locations)
    by: str  # the table or column that covers it, or the acknowledged location
    versions: list[VersionUse] = field(default_factory=list)

    @property
    def live_versions(self) -> list[int]:
        """Versions whose key still exists: their values can still be lost by destroying it."""
        return [v.version for v in self.versions if v.state != "destroyed"]

    @property
    def encryptions(self) -> int:
        return sum(v.encryptions for v in self.versions)

    @property
    def last_seen(self) -> datetime:
        return max(v.last_seen for v in self.versions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "location": self.location,
            "display": display(self.location),
            "coverage": self.coverage,
            "by": self.by,
            "encryptions": self.encryptions,
            "last_seen": self.last_seen.isoformat(),
            "versions": [v.as_dict() for v in self.versions],
        }


async def list_locations(session: AsyncSession) -> list[LocationView]:
    """Every recorded (scope, location), by scope and location, with its coverage."""
    covers = await registered_covers(session)
    acks = await acknowledged_locations(session)
    views: dict[tuple[str, str], LocationView] = {}
    for scope, location, version, state, n, first, last in await store.location_versions(session):
        view = views.get((scope, location))
        if view is None:
            coverage, by = classify(scope, location, covers, acks)
            view = views[(scope, location)] = LocationView(scope, location, coverage, by)
        view.versions.append(VersionUse(version, state, n, first, last))
    return list(views.values())


def unregistered(views: list[LocationView]) -> list[LocationView]:
    """Locations the census cannot count, holding values of versions not destroyed."""
    return [v for v in views if v.coverage == UNREGISTERED and v.live_versions]


async def unregistered_locations(session: AsyncSession) -> list[LocationView]:
    """:func:`unregistered` of every recorded location."""
    return unregistered(await list_locations(session))


def advice(found: list[LocationView], *, limit: int = 5) -> str:
    """One line: which locations are unregistered, and what to run about them."""
    named = ", ".join(
        f"{display(v.location)} ({v.scope} " + ", ".join(f"v{n}" for n in v.live_versions) + ")"
        for v in found[:limit]
    )
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    # A location shaped like TABLE.COLUMN (the README's convention) gets its own command.
    column = next((v for v in found if _COLUMN_LIKE.fullmatch(v.location)), None)
    register = (
        f"keyrotor columns register {column.location} --pk ID --scope {column.scope}"
        if column is not None
        else "keyrotor columns register TABLE.COLUMN --pk ID --scope SCOPE"
    )
    unrecorded = (
        f". {UNRECORDED} stands for values sealed before keyrotor recorded locations: once every "
        f"table holding them is registered, `keyrotor columns ignore '{UNRECORDED}' --reason TEXT`"
        if any(v.location == UNRECORDED for v in found)
        else ""
    )
    second = next((v.location for v in found if v.location.startswith(SECOND_PHASE_PREFIX)), None)
    if second is not None:
        unrecorded += (
            f". {second} stands for values the old backend sealed with an imported DEK, in any table: "
            f"once every table holding them is registered and `keyrotor legacy migrate` has run, "
            f"`keyrotor columns ignore '{second}' --reason TEXT`"
        )
    return (
        f"{len(found)} unregistered location(s) hold values keyrotor cannot count: {named}{more}; "
        f"their DEK versions will not be destroyed. Register each table that stores them "
        f"(`{register}`) or, if its values may be lost, "
        f"`keyrotor columns ignore LOCATION --reason TEXT`{unrecorded}"
    )


def parse_location(name: str) -> str:
    """A location as an operator names it (``(no context)`` or ``''`` for the empty one).

    Raises:
        InvalidInput: too long, or not printable text.
    """
    if name == display(NO_CONTEXT):
        return NO_CONTEXT
    if len(name) > MAX_LOCATION_CHARS or not name.isprintable():
        raise InvalidInput(f"a location is printable text of at most {MAX_LOCATION_CHARS} characters")
    return name


def _check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise InvalidInput("--reason must say why the values there may be lost")
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise InvalidInput(f"--reason is printable text of at most {MAX_REASON_CHARS} characters")
    return reason


async def _ack(session: AsyncSession, location: str) -> dict[str, Any] | None:
    """``location``'s acknowledgements: the scopes they cover, the newest one's reason, actor
    and time, and each one (None: not acknowledged)."""
    rows = await store.acknowledgements(session, location)
    if not rows:
        return None
    each = [
        {"scope": scope, "reason": reason, "actor": actor, "acknowledged_at": at.isoformat()}
        for scope, reason, actor, at in rows
    ]
    newest = max(rows, key=lambda r: r[3])
    return {
        "location": location,
        "scopes": [r[0] for r in rows],
        "reason": newest[1],
        "actor": newest[2],
        "acknowledged_at": newest[3].isoformat(),
        "acknowledgements": each,
    }


def _check_scopes(scopes: Sequence[str]) -> list[str]:
    return sorted({check_scope(s) for s in scopes})


async def ignore(
    session: AsyncSession,
    location: str,
    *,
    reason: str,
    actor: str,
    scopes: Sequence[str] = (),
    every_scope: bool = False,
) -> dict[str, Any]:
    """Acknowledge ``location`` (its values may be lost) for ``scopes``, for every scope now and
    later (``every_scope``), or, with neither, for the scopes whose values were recorded there so
    far; audited. Returns the location's acknowledgements.

    A scope that begins writing there later is not covered by an acknowledgement of other
    scopes: its versions are kept until an operator says the same of it.

    Raises:
        InvalidInput: bad location, reason or scope, or both ``scopes`` and ``every_scope``.
        NotFound: no value was ever recorded at that location, or for one of ``scopes`` there
            (a typo would acknowledge nothing).
    """
    location, reason, named = parse_location(location), _check_reason(reason), _check_scopes(scopes)
    if named and every_scope:
        raise InvalidInput("name scopes with --scope or acknowledge every scope with --all-scopes, not both")
    recorded = await store.recorded_scopes(session, location)
    if not recorded:
        raise NotFound(
            f"no value was recorded at location {display(location)!r}: see `keyrotor columns list`"
        )
    missing = [s for s in named if s not in recorded]
    if missing:
        raise NotFound(
            f"no value of scope {missing[0]!r} was recorded at location {display(location)!r} "
            "(to cover scopes that may write there later: --all-scopes); see `keyrotor columns list`"
        )
    targets = [EVERY_SCOPE] if every_scope else named or recorded
    before = await _ack(session, location)
    await store.acknowledge(session, location, targets, reason, actor)
    after = await _ack(session, location)
    assert after is not None
    await record_config_change(session, actor, "location_ack", before, after)
    return after


async def unignore(
    session: AsyncSession, location: str, *, actor: str, scopes: Sequence[str] = ()
) -> dict[str, Any]:
    """Take back the acknowledgements of ``location`` for ``scopes`` (none named: all of them);
    audited. Returns what was removed.

    Raises:
        InvalidInput: bad location or scope.
        NotFound: the location is not acknowledged (for one of ``scopes``).
    """
    location, named = parse_location(location), _check_scopes(scopes)
    before = await _ack(session, location)
    if before is None:
        raise NotFound(f"location {display(location)!r} is not acknowledged: see `keyrotor columns list`")
    missing = [s for s in named if s not in before["scopes"]]
    if missing:
        raise NotFound(
            f"location {display(location)!r} is not acknowledged for scope {missing[0]!r} "
            f"(it is for: {', '.join(before['scopes'])}); see `keyrotor columns list`"
        )
    await store.drop_acknowledgements(session, location, named or None)
    after = await _ack(session, location)
    await record_config_change(session, actor, "location_ack", before, after)
    if not named:
        return before
    kept = [a for a in before["acknowledgements"] if a["scope"] in named]
    return {"location": location, "scopes": named, "acknowledgements": kept}
