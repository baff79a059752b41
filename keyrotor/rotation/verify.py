"""Verification: decrypt every stored value and report what fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from keyrotor.census.columns import list_columns
from keyrotor.errors import KeyrotorError
from keyrotor.keys import KeyManager
from keyrotor.store import db, repo
from keyrotor.store.key_ranges import Key
from keyrotor.store.targets import read_page


@dataclass
class VerifyFailure:
    """One value that did not decrypt: where it is and why (never what it holds)."""

    table: str
    row_id: Key
    scope: str
    name: str
    error: str


@dataclass
class VerifyReport:
    """Counts and failures of one verification pass."""

    checked: int = 0
    ok: int = 0
    failures: list[VerifyFailure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


async def verify_secrets(
    km: KeyManager,
    scope: str | None = None,
    *,
    page_size: int = 1_000,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Decrypt every value in ``secrets`` (of one scope, or all) and report failures.

    Reads in keyset pages, so memory stays flat however large the table is.
    """
    report = VerifyReport()
    after = 0
    while True:
        async with db.transaction(km.sessions) as session:
            page = await repo.iter_secrets_page(session, scope=scope, after_id=after, limit=page_size)
        if not page:
            return report
        for row_id, row_scope, name, ciphertext in page:
            report.checked += 1
            try:
                await km.decrypt(row_scope, ciphertext, context=f"secret:{name}")
            except KeyrotorError as exc:
                report.failures.append(
                    VerifyFailure("secrets", row_id, row_scope, name, f"{type(exc).__name__}: {exc}")
                )
            else:
                report.ok += 1
        after = page[-1][0]
        if on_progress is not None:
            on_progress(len(page))


async def verify_columns(
    km: KeyManager,
    scope: str | None = None,
    *,
    page_size: int = 1_000,
    on_progress: Callable[[int], None] | None = None,
    report: VerifyReport | None = None,
) -> VerifyReport:
    """Decrypt every value of every registered application column (``keyrotor columns``).

    A legacy value still decrypts (with ENCRYPTION_KEY) and counts as ok. A row whose scope
    column is empty fails, named.
    """
    report = report or VerifyReport()
    async with db.transaction(km.sessions) as session:
        columns = await list_columns(session)
    for col in columns:
        if scope is not None and col.scope is not None and col.scope != scope:
            continue
        after: Key | None = None  # from the first key, whatever the key's type
        while True:
            async with db.transaction(km.sessions) as session:
                if after is None:
                    page = await read_page(session, col.page_sql(first=True), page_size)
                else:
                    page = await read_page(session, col.page_sql(), after, page_size)
            if not page:
                break
            for row_id, value, row_scope in page:
                row_scope = col.scope_of(row_scope)
                if scope is not None and row_scope != scope:
                    continue
                report.checked += 1
                try:
                    if not row_scope:
                        raise KeyrotorError("the row has no scope")
                    await km.decrypt(row_scope, value, context=col.context(row_id))
                except KeyrotorError as exc:
                    report.failures.append(
                        VerifyFailure(col.name, row_id, row_scope or "", "", f"{type(exc).__name__}: {exc}")
                    )
                else:
                    report.ok += 1
            after = page[-1][0]
            if on_progress is not None:
                on_progress(len(page))
    return report
