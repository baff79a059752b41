"""Where values live: the locations a DEK version's values were sealed for, and which the census covers.

A value's *location* is its encrypt ``context`` up to the last ``:`` (``users.api_key:42`` ->
``users.api_key``; a context without ``:`` is its own location; ``""`` is "no context"). Every
encrypt records its (scope, DEK version, location) in ``key_locations`` (migration 0008_census)
before the ciphertext is returned, so a retirement can ask: did values of this version go
anywhere the census does not count?

A location is *covered* when the census counts the rows it names:

- keyrotor's own ``secrets`` table (contexts ``secret:<name>``);
- a registered column (``keyrotor columns register``) of the same scope whose context template
  can produce contexts with that location.

Otherwise it is *acknowledged* when an operator named it with ``keyrotor columns ignore`` for
that scope, or for every scope (its values may be lost, and the operator said so), or
*unregistered*. A DEK version with an
unregistered location is never destroyed (:func:`uncovered_locations`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store import census as store
from keyrotor.store.columns import key_type

PK_PLACEHOLDER = "{pk}"
# The context template of keyrotor's own secrets table (keys.py seals them as ``secret:<name>``).
SECRETS_TEMPLATE = "secret:" + PK_PLACEHOLDER
NO_CONTEXT = ""
# The location migration 0008 gives every version that existed before locations were recorded.
UNRECORDED = "(unrecorded)"
# The scope of an acknowledgement that covers every scope (those given before migration 0018).
EVERY_SCOPE = "*"
# The location of the values the old backend's second phase sealed with a DEK keyrotor imported
# (keyrotor/legacy/second_phase.py): they may be in any table, and no encrypt recorded where. One
# per imported DEK, so that an acknowledgement of one never covers a DEK imported later.
SECOND_PHASE_PREFIX = "(second phase: "

COVERED_BY_KEYROTOR = "keyrotor"
COVERED_BY_COLUMN = "registered"
ACKNOWLEDGED = "acknowledged"
UNREGISTERED = "unregistered"


def second_phase_location(scope: str, version: int) -> str:
    """The location standing for the values the old backend sealed with ``scope`` v``version``."""
    return f"{SECOND_PHASE_PREFIX}{scope} v{version})"


def is_placeholder(location: str) -> bool:
    """Whether ``location`` stands for values keyrotor cannot place (no registered column covers
    it: only an operator's acknowledgement, once every table holding them is registered)."""
    return location == UNRECORDED or location.startswith(SECOND_PHASE_PREFIX)


def location_of(context: str) -> str:
    """The location of a value sealed with ``context``: the context up to its last ``:``."""
    head, sep, _ = context.rpartition(":")
    return head if sep else context


def context_prefix(template: str) -> str | None:
    """The text before the key when ``template`` is that text followed by one ``{pk}`` and
    nothing else (``settings.api_key:{pk}`` -> ``settings.api_key:``), else None."""
    head, placeholder, tail = template.partition(PK_PLACEHOLDER)
    if not placeholder or tail or PK_PLACEHOLDER in head:
        return None
    return head


def count_locations(contexts: Sequence[str], *, prefix: str | None = None) -> dict[str, int]:
    """How many of ``contexts`` have each location: ``Counter(map(location_of, contexts))``.

    With ``prefix`` (each context is ``prefix`` and a key, as a target with a
    ``context_prefix`` builds them), a batch whose prefix holds a ``:`` and whose keys hold none
    has one location, found with one count over the batch instead of a look at each context:
    the usual case of a rotation batch.
    """
    # Each context holds the prefix's colons and its key's: no more in all of them means no key
    # holds one, so every location is the prefix up to its last ':'.
    colons = prefix.count(":") if prefix else 0
    if contexts and prefix and colons and "".join(contexts).count(":") == len(contexts) * colons:
        return {prefix[: prefix.rfind(":")]: len(contexts)}
    return dict(Counter(map(location_of, contexts)))


def display(location: str) -> str:
    """A location as people read it (``(no context)`` for the empty one)."""
    return location if location else "(no context)"


def template_covers(template: str, location: str, key: str | None = None) -> bool:
    """Whether some key substituted into ``template`` (``{pk}`` placeholders) gives ``location``.

    ``key`` is a regular expression of the keys' text when it can hold no ``:`` (integer and
    uuid keys: :attr:`keyrotor.store.key_ranges.KeyType.text_pattern`); None: any text, ``:``
    included (text keys such as ``a:b`` exist), so a template ending in ``:{pk}`` covers its
    prefix and everything under it. A template that starts with its key covers every location
    only when that key may be any text: ``{pk}@settings`` of an integer key covers ``42@settings``,
    never ``users.api_key``.
    """
    parts = template.split(PK_PLACEHOLDER)
    if len(parts) == 1:  # no key in the context: one fixed location
        return location_of(template) == location
    if key is not None:
        # No key holds a ':', so the context's last ':' is the template's last literal one.
        last = max((i for i, p in enumerate(parts) if ":" in p), default=None)
        if last is not None:
            parts = [*parts[:last], parts[last][: parts[last].rfind(":")]]
        pattern = f"(?:{key})".join(re.escape(p) for p in parts)
        return re.fullmatch(pattern, location, re.DOTALL) is not None
    before, tail = parts[0], parts[-1]
    if ":" in tail:
        # The context's last ':' is in the literal text after the (last) key.
        head = PK_PLACEHOLDER.join(parts[:-1]) + PK_PLACEHOLDER + tail[: tail.rfind(":")]
        pattern = ".*".join(re.escape(p) for p in head.split(PK_PLACEHOLDER))
        return re.fullmatch(pattern, location, re.DOTALL) is not None
    # The last ':' is inside a key, or in the literal text before the first key, or nowhere.
    if location.startswith(before):
        return True
    return ":" in before and location == before[: before.rfind(":")]


def templates_collide(a: str, a_integer: bool, b: str, b_integer: bool) -> bool:
    """Whether two context templates may give the same context (``*_integer``: the template's
    key is an integer, so it can spell only digits and a sign; other keys may spell any text).

    Decided on the literal text before each first ``{pk}``, erring towards "collide": when
    neither of the two is a prefix of the other, their contexts differ in that text; when one
    is, the shorter one's key must spell the rest.
    """
    head_a, _, tail_a = a.partition(PK_PLACEHOLDER)
    head_b, _, tail_b = b.partition(PK_PLACEHOLDER)
    if head_a == head_b:
        if not (a_integer and b_integer):
            return True
        # Two integer keys after the same text: one context needs the same key and the same rest.
        return (
            tail_a == tail_b
            or _starts_integer(tail_a)
            or _starts_integer(tail_b)
            or PK_PLACEHOLDER in tail_a + tail_b
        )
    short, short_integer, long = (
        (head_a, a_integer, head_b) if len(head_a) < len(head_b) else (head_b, b_integer, head_a)
    )
    if not long.startswith(short):
        return False
    return not short_integer or _starts_integer(long[len(short) :])


def _starts_integer(text: str) -> bool:
    return text[:1].isdigit() or text[:1] == "-"


@dataclass(frozen=True)
class Cover:
    """A place the census counts: a context template, the one scope it holds (None: any), and
    the pattern of its keys' text (None: any text; see :func:`template_covers`)."""

    template: str
    scope: str | None
    name: str
    key: str | None = None

    def covers(self, scope: str, location: str) -> bool:
        return (self.scope is None or self.scope == scope) and template_covers(
            self.template, location, self.key
        )


SECRETS_COVER = Cover(SECRETS_TEMPLATE, None, "secrets")


def classify(
    scope: str, location: str, covers: Iterable[Cover], acknowledged: Collection[tuple[str, str]]
) -> tuple[str, str]:
    """``(coverage, by)`` of one location of ``scope``: keyrotor's own table, a registered column,
    an operator's acknowledgement of it for that scope or for every scope (``acknowledged``
    holds ``(location, scope)``, scope :data:`EVERY_SCOPE` for every one), or unregistered
    (``by`` is then ``""``)."""
    if not is_placeholder(location):
        if SECRETS_COVER.covers(scope, location):
            return COVERED_BY_KEYROTOR, SECRETS_COVER.name
        for cover in covers:
            if cover.covers(scope, location):
                return COVERED_BY_COLUMN, cover.name
    if (location, scope) in acknowledged or (location, EVERY_SCOPE) in acknowledged:
        return ACKNOWLEDGED, location
    return UNREGISTERED, ""


async def registered_covers(session: AsyncSession) -> list[Cover]:
    """The covers of every registered column, each with its key's pattern as the catalog has the
    key's type now (a key whose table or type is gone: any text, as before)."""
    out = []
    for table, column, scope, template, pk in await store.covers(session):
        kt = await key_type(session, table, pk)
        out.append(Cover(template, scope, f"{table}.{column}", kt.text_pattern if kt else None))
    return out


async def acknowledged_locations(session: AsyncSession) -> set[tuple[str, str]]:
    """``(location, scope)`` an operator acknowledged with ``keyrotor columns ignore`` (scope
    :data:`EVERY_SCOPE`: every scope)."""
    return await store.acknowledged_locations(session)


async def uncovered_locations(session: AsyncSession, scope_id: int, scope: str, version: int) -> list[str]:
    """Locations that received values of ``scope`` v``version`` which the census cannot count
    and no operator acknowledged: while any is listed, that version must not be destroyed."""
    recorded = await store.recorded_locations(session, scope_id, version)
    covers = await registered_covers(session)
    acks = await acknowledged_locations(session)
    return [loc for loc in recorded if classify(scope, loc, covers, acks)[0] == UNREGISTERED]


async def record_batch(apg: Any, scope_id: int, version: int, counts: Mapping[str, int]) -> None:
    """Record ``counts`` (location -> values sealed there) of a batch under ``scope_id``
    v``version``, inside the caller's transaction (``apg``: its asyncpg connection)."""
    if counts:
        locations = sorted(counts)
        await store.record_location_counts(
            apg, scope_id, version, locations, [counts[loc] for loc in locations]
        )
