"""Verification: decrypt every stored value and report what fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from keyrotor.errors import KeyrotorError
from keyrotor.keys import KeyManager
from keyrotor.store import db, repo


@dataclass
class VerifyFailure:
    """One value that did not decrypt: where it is and why (never what it holds)."""

    table: str
    row_id: int
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
