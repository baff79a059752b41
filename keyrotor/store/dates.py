"""SQL for due dates: a number of days from now, as keyrotor counts days.

``now() + make_interval(days => n)`` adds calendar days in the session's ``TimeZone``: on a
server whose zone observes daylight saving (initdb takes the host's), a span across a change
comes out 23 or 25 hours a day short or long. keyrotor counts a policy's days as 24 hours
everywhere else (``keyrotor.schedule.rules``, the dry runs), and a destruction window must
never end an hour before its minimum, so every due date is now plus 24-hour days, whatever the
zone.
"""

from __future__ import annotations


def days_from_now(days: str) -> str:
    """SQL for ``now()`` plus ``days`` (an SQL expression: a column, a parameter) days of 24 hours."""
    return f"now() + make_interval(hours => 24 * ({days}))"
