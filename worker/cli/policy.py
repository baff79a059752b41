"""``keyrotor policy set`` and ``keyrotor policy show``: rotation policies per scope.

These commands need only ``DATABASE_URL``: a policy is configuration, no key is touched. Each
change is a ``config_change`` audit event (before and after in its metadata), written in the
transaction that makes the change, by the actor ``--as`` names (default
``KEYROTOR_DEFAULT_ACTOR``). Bad input changes nothing and exits 2 with one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.log import check_actor
from keyrotor.errors import InvalidInput
from keyrotor.inputs import check_scope
from keyrotor.schedule.policies import PolicyView, count_scopes, get_policy, list_policies, set_policy
from keyrotor.schedule.rules import PRESET_INTERVAL_DAYS
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, out_console, print_json, run, settings

T = TypeVar("T")

app = typer.Typer(
    help="Rotation policies: interval (30/60/90 days or any 1-365), grace, usage limit, next rotation.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="policy")


async def _with_sessions(fn: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    engine = db.create_engine(settings().database_url, pool_size=1, max_overflow=1)
    try:
        return await fn(db.sessionmaker(engine))
    finally:
        await engine.dispose()


def parse_when(value: str, *, now: datetime) -> datetime:
    """``now`` or an ISO 8601 date/time (no zone means UTC).

    Raises:
        InvalidInput: anything else.
    """
    text_ = value.strip()
    if text_ == "now":
        return now
    try:
        parsed = datetime.fromisoformat(text_)
        # OverflowError: a time at the edge of the calendar (9999-12-31T23:00-05:00) has no UTC.
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        shown = value[:40].encode("ascii", "backslashreplace").decode()
        raise InvalidInput(
            f"invalid time {shown!r}: use ISO 8601 (2026-01-31, 2026-01-31T12:00:00Z) or 'now'"
        ) from None


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def _describe(doc: dict[str, Any]) -> str:
    if not doc["enabled"]:
        return f"{doc['scope']}: rotation disabled (grace {doc['grace_period_days']} days)"
    limit = doc["max_encryptions"] if doc["max_encryptions"] is not None else "default"
    return (
        f"{doc['scope']}: every {doc['interval_days']} days, grace {doc['grace_period_days']} days, "
        f"max encryptions {limit}, next rotation {_when(doc['next_rotation_at'])} UTC"
    )


@app.command("set")
def set_(
    scope: Annotated[str, typer.Argument(help="the scope")],
    interval_days: Annotated[
        int | None,
        typer.Option("--interval-days", help=f"rotate every N days: {PRESET_INTERVAL_DAYS} or any 1-365"),
    ] = None,
    grace_days: Annotated[
        int | None, typer.Option("--grace-days", help="old DEK keeps decrypting N days (0..interval)")
    ] = None,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="scheduled rotation on or off")
    ] = None,
    next_rotation_at: Annotated[
        str | None,
        typer.Option("--next-rotation-at", help="ISO 8601 (no zone: UTC) or 'now'; a past time is due now"),
    ] = None,
    max_encryptions: Annotated[
        int | None,
        typer.Option(
            "--max-encryptions",
            help="rotate early after N encryptions by one DEK (1..2**31; 0: the global default)",
        ),
    ] = None,
    as_: Annotated[
        str | None, typer.Option("--as", help="who makes the change (default: KEYROTOR_DEFAULT_ACTOR)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a scope's rotation policy (a ``config_change`` audit event)."""
    check_scope(scope)
    cfg = settings()
    actor = check_actor(as_ if as_ is not None else cfg.default_actor)
    now = datetime.now(UTC)
    when = parse_when(next_rotation_at, now=now) if next_rotation_at is not None else None
    _check_change(interval_days, grace_days, enable, when, max_encryptions)

    async def go(sessions: async_sessionmaker[AsyncSession]) -> tuple[PolicyView, PolicyView]:
        async with db.transaction(sessions) as session:
            return await set_policy(
                session,
                scope,
                actor=actor,
                now=now,
                default_max=cfg.max_encryptions_per_dek,
                enabled=enable,
                interval_days=interval_days,
                grace_days=grace_days,
                max_encryptions=max_encryptions or None,
                clear_max_encryptions=max_encryptions == 0,
                next_rotation_at=when,
            )

    before, after = run(lambda: _with_sessions(go))
    _print_change(before, after, now, json_out=json_out)


def _check_change(
    interval_days: int | None,
    grace_days: int | None,
    enable: bool | None,
    when: datetime | None,
    max_encryptions: int | None,
) -> None:
    if max_encryptions is not None and max_encryptions < 0:
        raise InvalidInput(f"max encryptions cannot be negative, got {max_encryptions}")
    if all(v is None for v in (interval_days, grace_days, enable, when, max_encryptions)):
        raise InvalidInput(
            "nothing to change: give --interval-days, --grace-days, --enable/--disable, "
            "--next-rotation-at or --max-encryptions"
        )


def _print_change(before: PolicyView, after: PolicyView, now: datetime, *, json_out: bool) -> None:
    changed = before.policy != after.policy
    if json_out:
        print_json({"changed": changed, "before": before.as_dict(now), "after": after.as_dict(now)})
        return
    err_console.print(("" if changed else "unchanged: ") + _describe(after.as_dict(now)))
    if changed and after.due_reason(now):
        err_console.print("due now: the scheduler opens its rotation at its next scan")


@app.command("show")
def show(
    scope: Annotated[str | None, typer.Argument(help="one scope (default: all)")] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="without SCOPE: at most N scopes, by name (1..1000000)")
    ] = 10_000,
    json_out: JsonOpt = False,
) -> None:
    """Rotation policies: interval, grace, usage against its limit, next and last rotation."""
    if scope is not None:
        check_scope(scope)
    if not 1 <= limit <= 1_000_000:
        raise InvalidInput(f"--limit must be 1-1000000, got {limit}")
    cfg = settings()
    now = datetime.now(UTC)

    async def go(sessions: async_sessionmaker[AsyncSession]) -> tuple[list[PolicyView], int]:
        async with db.transaction(sessions) as session:
            if scope is not None:
                return [await get_policy(session, scope, default_max=cfg.max_encryptions_per_dek)], 1
            views = await list_policies(session, default_max=cfg.max_encryptions_per_dek, limit=limit)
            # Say so when the list is cut short, rather than pass a part for the whole.
            return views, (await count_scopes(session) if len(views) == limit else len(views))

    views, total = run(lambda: _with_sessions(go))
    docs = [v.as_dict(now) for v in views]
    if json_out:
        print_json(
            {"now": now.isoformat(), "policies": docs, "total_scopes": total, "truncated": total > len(docs)}
        )
        return
    if not docs:
        err_console.print("no scopes yet")
        return
    if total > len(docs):
        err_console.print(f"showing the first {len(docs):,} of {total:,} scopes by name (--limit)")
    table = Table(title="rotation policies")
    for col in ("scope", "rotation", "grace", "encryptions / limit", "next rotation (UTC)", "last", "due"):
        table.add_column(col)
    for d in docs:
        enc_limit = f"{d['encryption_limit']:,}" + ("" if d["max_encryptions"] is not None else " (default)")
        table.add_row(
            d["scope"],
            f"every {d['interval_days']} d" if d["enabled"] else "disabled",
            f"{d['grace_period_days']} d",
            f"{d['encryptions']:,} / {enc_limit}",
            _when(d["next_rotation_at"]),
            _when(d["last_rotation_at"]),
            (d["due"] or "-") + (" (run open)" if d["run_open"] else ""),
        )
    out_console.print(table)
