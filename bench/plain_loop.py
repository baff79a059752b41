"""The second ceiling of rotation: a plain ``UPDATE ... FROM unnest`` batch loop.

What this database does for a re-encryption without keyrotor: a table with only its primary key
(``id bigint PRIMARY KEY, value text``) holding the same values, rewritten in batches of the
same size, one transaction a batch (``synchronous_commit = off``, like a rotation batch): a
keyset ``SELECT id, value ... ORDER BY id LIMIT n``, then one ``UPDATE ... FROM unnest`` by id.
No crypto (the version field changes, the body is kept: values keep their length), no version
column or index, no compare-and-swap, no census, no progress rows. ``streams`` connections
each take a contiguous share of the ids.

The rotation's own ceiling (same code, crypto stubbed out) divided by this one is what
keyrotor's statements cost over the least a batch loop can do.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import asyncpg

TABLE = "plain_values"


async def load(url: str, values: list[str]) -> None:
    """(Re)create the table with ``values`` (ids 1..n), vacuumed and analysed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, value text NOT NULL)")
        await conn.copy_records_to_table(TABLE, records=list(enumerate(values, 1)), columns=["id", "value"])
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
    finally:
        await conn.close()


async def _stream(url: str, after: int, hi: int, batch: int) -> int:
    conn = await asyncpg.connect(url)
    select = f"SELECT id, value FROM {TABLE} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
    update = (
        f"UPDATE {TABLE} AS t SET value = u.new FROM unnest($1::bigint[], $2::text[]) AS u(id, new) "
        "WHERE t.id = u.id"
    )
    done = 0
    try:
        while True:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                rows = await conn.fetch(select, after, hi, batch)
                if not rows:
                    return done
                ids = [r[0] for r in rows]
                new = [_next_version(r[1]) for r in rows]
                await conn.execute(update, ids, new)
            after = ids[-1]
            done += len(ids)
    finally:
        await conn.close()


def _next_version(value: str) -> str:
    _, version, body = value.split(":", 2)
    return f"kr1:{int(version) + 1}:{body}"


async def rate(url: str, n: int, *, streams: int, batch: int) -> float:
    """Rewrite all ``n`` rows once with ``streams`` connections at a time. Returns rows/s."""
    bounds = [n * i // streams for i in range(streams + 1)]
    t0 = time.perf_counter()
    done = await asyncio.gather(*(_stream(url, lo, hi, batch) for lo, hi in itertools.pairwise(bounds)))
    seconds = time.perf_counter() - t0
    assert sum(done) == n, (done, n)
    return n / seconds
