"""`txroute ops idempotency --client C [--key K]`: what a client's Idempotency-Keys were first used for.

An idempotency-conflict spike (`422 idempotency_key_reused`, `409 idempotency_key_in_flight`) is a client
reusing keys for other requests, or retrying while its first request still runs. Nothing on our side needs
fixing unless the keys are ours (the router forwards keys as given). This shows the client what each key
was first stored with: when, the status answered, and the transfer or account it made.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.ops.target import Target, each_shard

ROWS_MAX = 50

_KEYS = """
    select key, status_code, coalesce(body ->> 'id', body ->> 'code') as result, created_at
    from idempotency where client = $1 and ($2::text is null or key = $2)
    order by created_at desc limit $3"""


async def keys(target: Target, *, client: str, key: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    async def read(conn: asyncpg.Connection, shard: str) -> list[dict[str, Any]]:
        return [{"shard": shard, **dict(r)} for r in await conn.fetch(_KEYS, client, key, ROWS_MAX)]

    results = await each_shard(target, read)
    rows = sorted((row for r in results if r.value for row in r.value), key=lambda r: r["created_at"], reverse=True)
    return rows[:ROWS_MAX], [f"{r.shard}: {r.error}" for r in results if r.error]


def text(client: str, rows: list[dict[str, Any]], unreadable: list[str]) -> str:
    lines = [f"client {client}: {len(rows)} stored Idempotency-Key(s) (newest first, at most {ROWS_MAX})"]
    for r in rows:
        lines.append(f"  {r['created_at'].isoformat()}  {r['shard']:<8} key={r['key']!r} answered "
                     f"{r['status_code']} {r['result'] or ''}")
    lines += [f"  WARNING shard not read: {u}" for u in unreadable]
    return "\n".join(lines)
