"""Who and where: actor names, the caller of KeyManager calls, and the scope patterns of grants.

The audit log records actors and filters by scope patterns; the grants decide by both. Both
take their names from here, so neither has to import the other.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

from keyrotor.audit.events import MAX_ACTOR_CHARS, clean_short
from keyrotor.errors import InvalidInput
from keyrotor.inputs import check_scope, scope_fault

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a KeyManager call: the actor (a user id, a service name) and, optionally,
    the client's IP address and user agent."""

    actor: str
    ip: str | None = None
    user_agent: str | None = None
    who: tuple[str, str | None, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The tuple KeyManager records, built once rather than on every call.
        object.__setattr__(self, "who", (self.actor, self.ip, self.user_agent))


# The ContextVar behind actor_context (KeyManager reads it directly on every call).
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("keyrotor_audit_caller", default=None)


@contextlib.contextmanager
def actor_context(actor: str, *, ip: str | None = None, user_agent: str | None = None) -> Iterator[Caller]:
    """Make ``actor`` (and ``ip``, ``user_agent``) the caller of every KeyManager call in the block.

    A ContextVar: it follows the current task (and tasks it starts), so concurrent requests in
    one process each keep their own caller. Keyword arguments of a call override it::

        with actor_context("user:42", ip=request.remote, user_agent=request.headers.get("User-Agent")):
            key = await km.decrypt("openai", token)

    Raises:
        InvalidInput: ``actor`` is empty, too long, not printable, or ``*``.
    """
    caller = Caller(check_actor(actor), clean_short(ip), clean_short(user_agent))
    token = CALLER.set(caller)
    try:
        yield caller
    finally:
        CALLER.reset(token)


def current_caller() -> Caller | None:
    """The caller set by the innermost :func:`actor_context`, if any."""
    return CALLER.get()


def check_actor(actor: str, *, wildcard: bool = False) -> str:
    """Validate an actor name and return it.

    Actors are 1-200 printable characters without surrounding spaces. ``*`` is the wildcard
    of grants (``wildcard=True``), never a caller.

    Raises:
        InvalidInput: anything else.
    """
    if (
        not isinstance(actor, str)
        or not 0 < len(actor) <= MAX_ACTOR_CHARS
        or not actor.isprintable()
        or actor != actor.strip()
    ):
        raise InvalidInput(f"an actor is 1-{MAX_ACTOR_CHARS} printable characters without surrounding spaces")
    if actor == WILDCARD and not wildcard:
        raise InvalidInput("'*' is the wildcard of grants, not an actor")
    return actor


def check_pattern(pattern: str) -> str:
    """Validate a scope pattern (``*``, a scope, or ``prefix/*``) and return it.

    Raises:
        InvalidInput: anything else.
    """
    if pattern == WILDCARD:
        return pattern
    scope = pattern[:-2] if isinstance(pattern, str) and pattern.endswith("/*") else pattern
    try:
        check_scope(scope)
    except InvalidInput:
        # Said without the text, as check_scope does: it may be a key pasted into the wrong field.
        raise InvalidInput(
            f"invalid scope pattern ({scope_fault(scope)}): use a scope (anthropic), "
            "a prefix (tenant-42/*) or *"
        ) from None
    return pattern


def pattern_matches(pattern: str, scope: str) -> bool:
    """Whether ``scope`` falls under ``pattern``."""
    if pattern in (WILDCARD, scope):
        return True
    return pattern.endswith("/*") and scope.startswith(pattern[:-1])
