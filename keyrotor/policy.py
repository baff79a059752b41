"""Pure rules: key states, which versions decrypt, rotation policies and their dates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from keyrotor.errors import InvalidInput, InvalidScope, KeyVersionTooOld, KeyVersionUnknown

# Scope names are path-like: `anthropic`, `tenant-42/openai`. They appear in AAD, logs,
# metric labels and job ids, so they are kept to a small, printable alphabet.
_SCOPE_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?(?:/[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?){0,3}"
)
MAX_SCOPE_CHARS = 200
MIN_INTERVAL_DAYS = 1
MAX_INTERVAL_DAYS = 365
PRESET_INTERVAL_DAYS = (30, 60, 90)


def check_scope(scope: str) -> str:
    """Validate a scope name and return it.

    A scope is 1-4 segments separated by ``/``; each segment is lower-case letters, digits,
    ``.``, ``_`` and ``-``, starting and ending with a letter or digit.

    Raises:
        InvalidScope: anything else (the message quotes a sanitised version only).
    """
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS or not _SCOPE_RE.fullmatch(scope):
        shown = scope[:40].encode("ascii", "backslashreplace").decode() if isinstance(scope, str) else "?"
        raise InvalidScope(
            f"invalid scope name {shown!r}: use lower-case letters, digits, '.', '_', '-' "
            "and up to 4 '/'-separated segments, like 'anthropic' or 'tenant-42/openai'"
        )
    return scope


class KeyState(StrEnum):
    """The life of a DEK version.

    ``pending``: stored and announced, decrypts, does not encrypt yet.
    ``active``: the one version that encrypts; decrypts.
    ``grace``: superseded; still decrypts until ``grace_until`` and until no row needs it.
    ``retired``: no longer decrypts; its wrapped key is still stored.
    ``destroyed``: its wrapped key is erased; nothing can decrypt with it again.
    """

    PENDING = "pending"
    ACTIVE = "active"
    GRACE = "grace"
    RETIRED = "retired"
    DESTROYED = "destroyed"

    @property
    def decrypts(self) -> bool:
        """Whether values under a key in this state may be decrypted."""
        return self in (KeyState.PENDING, KeyState.ACTIVE, KeyState.GRACE)


def check_decryptable(scope: str, version: int, state: KeyState | None, latest_version: int) -> None:
    """Raise unless a DEK version in ``state`` may decrypt.

    Raises:
        KeyVersionUnknown: no such version (or newer than any known).
        KeyVersionTooOld: the version was retired or destroyed.
    """
    if state is None or version > latest_version:
        raise KeyVersionUnknown(f"{scope}: DEK v{version} is unknown")
    if not state.decrypts:
        raise KeyVersionTooOld(f"{scope}: DEK v{version} is {state.value} and no longer decrypts")


@dataclass(frozen=True)
class RotationPolicy:
    """When a scope's DEK rotates and how long the old one keeps decrypting."""

    enabled: bool = True
    interval_days: int = 90
    grace_days: int = 7

    def __post_init__(self) -> None:
        if not MIN_INTERVAL_DAYS <= self.interval_days <= MAX_INTERVAL_DAYS:
            raise InvalidInput(
                f"interval must be {MIN_INTERVAL_DAYS}-{MAX_INTERVAL_DAYS} days, got {self.interval_days}"
            )
        if self.grace_days < 0:
            raise InvalidInput(f"grace period cannot be negative, got {self.grace_days}")
        if self.grace_days > self.interval_days:
            raise InvalidInput(
                f"grace period ({self.grace_days} days) cannot be longer than the interval "
                f"({self.interval_days} days)"
            )

    @property
    def interval(self) -> timedelta:
        return timedelta(days=self.interval_days)

    @property
    def grace(self) -> timedelta:
        return timedelta(days=self.grace_days)

    def next_rotation_after(self, completed_at: datetime) -> datetime | None:
        """The next due time, counted from when a rotation actually completed."""
        return completed_at + self.interval if self.enabled else None

    def grace_until(self, activated_at: datetime) -> datetime:
        """When a DEK superseded at ``activated_at`` leaves its grace period."""
        return activated_at + self.grace
