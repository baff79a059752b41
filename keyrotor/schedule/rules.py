"""Pure rules: key states, which versions decrypt, rotation policies and their dates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from keyrotor.errors import InvalidInput, KeyVersionTooOld, KeyVersionUnknown

# Scope names are path-like: `anthropic`, `tenant-42/openai`. They appear in AAD, logs,
# metric labels and job ids, so they are kept to a small, printable alphabet.
MIN_INTERVAL_DAYS = 1
MAX_INTERVAL_DAYS = 365
PRESET_INTERVAL_DAYS = (30, 60, 90)


class KeyState(StrEnum):
    """The life of a DEK version.

    ``pending``: stored and announced, decrypts, does not encrypt yet.
    ``active``: the one version that encrypts; decrypts.
    ``grace``: superseded; still decrypts until ``grace_until`` and until no row needs it.
    ``retired``: proven unused; never encrypts, still decrypts (each use is audited and cancels
    the pending destruction); its wrapped key is kept until ``destroy_after``.
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
        return self is not KeyState.DESTROYED


def check_decryptable(scope: str, version: int, state: KeyState | None, latest_version: int) -> None:
    """Raise unless a DEK version in ``state`` may decrypt.

    Raises:
        KeyVersionUnknown: no such version (or newer than any known).
        KeyVersionTooOld: the version was destroyed.
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


# --- stored policies, due dates and retries (the scheduler's rules) -----------------------

# Random 96-bit GCM nonces: NIST SP 800-38D bounds one key at 2**32 encryptions. A limit may be
# at most half of that, and no DEK ever encrypts more (keyrotor.census.usage: HARD_CEILING).
MAX_ENCRYPTIONS_PER_DEK = 2**31


@dataclass(frozen=True)
class ScopePolicy:
    """A scope's stored rotation policy (the policy columns of ``key_scopes``).

    ``max_encryptions`` None means the global ``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``;
    ``next_rotation_at`` is None while rotation is disabled.
    """

    enabled: bool
    interval_days: int
    grace_days: int
    max_encryptions: int | None
    next_rotation_at: datetime | None

    def __post_init__(self) -> None:
        RotationPolicy(self.enabled, self.interval_days, self.grace_days)
        if self.max_encryptions is not None:
            check_max_encryptions(self.max_encryptions)

    def encryption_limit(self, default: int) -> int:
        """The encryptions a DEK of this scope may make before it is due."""
        return self.max_encryptions if self.max_encryptions is not None else default

    def due_reason(self, now: datetime, encryptions: int, default_max: int) -> str | None:
        """``schedule`` or ``usage`` if a rotation is due at ``now``, else None."""
        if not self.enabled:
            return None
        if encryptions >= self.encryption_limit(default_max):
            return "usage"
        if self.next_rotation_at is not None and self.next_rotation_at <= now:
            return "schedule"
        return None


def check_max_encryptions(value: int) -> int:
    """Validate a per-DEK encryption limit and return it.

    Raises:
        InvalidInput: below 1 or above 2**31.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ENCRYPTIONS_PER_DEK:
        raise InvalidInput(f"max encryptions must be 1-{MAX_ENCRYPTIONS_PER_DEK} (2**31), got {value}")
    return value


def change_policy(
    current: ScopePolicy,
    *,
    anchor: datetime,
    now: datetime,
    enabled: bool | None = None,
    interval_days: int | None = None,
    grace_days: int | None = None,
    max_encryptions: int | None = None,
    clear_max_encryptions: bool = False,
    next_rotation_at: datetime | None = None,
    encryptions: int = 0,
    default_max: int = MAX_ENCRYPTIONS_PER_DEK,
) -> ScopePolicy:
    """The policy after a change (None: leave that field as it is).

    Due dates: an explicit ``next_rotation_at`` wins; otherwise a new interval, or enabling,
    counts the interval from ``anchor`` (the last rotation, else the active DEK's activation), so
    a shorter interval may make the scope due at once. Disabling clears the due date. A DEK that
    has already made at least the (new) ``max_encryptions`` is due now.

    Raises:
        InvalidInput: the interval, grace or limit is out of range, the grace is longer than the
            interval, or a due date is given for a disabled scope.
    """
    new_enabled = current.enabled if enabled is None else enabled
    new_interval = current.interval_days if interval_days is None else interval_days
    new_grace = current.grace_days if grace_days is None else grace_days
    new_max = None if clear_max_encryptions else current.max_encryptions
    if max_encryptions is not None:
        new_max = check_max_encryptions(max_encryptions)
    policy = RotationPolicy(new_enabled, new_interval, new_grace)  # validates
    if not new_enabled:
        if next_rotation_at is not None:
            raise InvalidInput("a next rotation time needs rotation enabled (add --enable)")
        return ScopePolicy(False, new_interval, new_grace, new_max, None)
    if next_rotation_at is not None:
        if next_rotation_at.tzinfo is None:
            raise InvalidInput("the next rotation time needs a time zone (e.g. ...Z)")
        new_next: datetime | None = next_rotation_at
    elif not current.enabled or new_interval != current.interval_days or current.next_rotation_at is None:
        new_next = policy.next_rotation_after(anchor)
    else:
        new_next = current.next_rotation_at
    limit = new_max if new_max is not None else default_max
    if encryptions >= limit and (new_next is None or new_next > now):
        new_next = now
    return ScopePolicy(True, new_interval, new_grace, new_max, new_next)


def retry_delay(failures: int, *, base_s: float, max_s: float) -> timedelta:
    """How long to wait after the ``failures``-th consecutive failed run before trying again.

    0 failures: no wait; then ``base_s``, doubling with each failure, capped at ``max_s``.
    """
    if failures <= 0:
        return timedelta(0)
    return timedelta(seconds=min(max_s, base_s * 2 ** min(failures - 1, 32)))
