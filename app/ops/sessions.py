"""`txroute ops sessions`: database sessions that hold a transaction open for long, and whom they block.

A session that keeps a transaction open while holding locks (an analyst's `psql`, a stuck migration, a
runaway query) makes postings wait until `lock_timeout` and fail with 503 `shard_unavailable`: high latency
and 5xx. `--terminate-blockers` ends only the sessions whose transaction is older than `--older-than` and
that block another one now, or sit `idle in transaction` (holding their locks while doing nothing, which
the services' own connections never do for long: `idle_in_transaction_session_timeout`). The blocked
postings then go through, and a client's retry with the same Idempotency-Key is safe.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.ops.target import Target, confirm, each_shard

_SESSIONS = """
    select a.pid, a.usename, a.application_name, a.client_addr::text as client_addr, a.state,
           a.wait_event_type, extract(epoch from clock_timestamp() - a.xact_start)::float as xact_s,
           left(a.query, 80) as query,
           exists (select 1 from pg_stat_activity b where a.pid = any(pg_blocking_pids(b.pid))) as blocking,
           (select count(*) from pg_stat_activity b where a.pid = any(pg_blocking_pids(b.pid))) as blocked_count
    from pg_stat_activity a
    where a.datname = current_database() and a.pid <> pg_backend_pid() and a.xact_start is not null
      and a.xact_start <= clock_timestamp() - make_interval(secs => $1)
    order by a.xact_start"""


async def sessions(target: Target, *, older_than_s: float) -> tuple[list[dict[str, Any]], list[str]]:
    async def read(conn: asyncpg.Connection, shard: str) -> list[dict[str, Any]]:
        return [{"shard": shard, **dict(r)} for r in await conn.fetch(_SESSIONS, older_than_s)]

    results = await each_shard(target, read)
    return [row for r in results if r.value for row in r.value], [f"{r.shard}: {r.error}" for r in results if r.error]


def text(rows: list[dict[str, Any]], unreadable: list[str]) -> str:
    lines = [f"{len(rows)} session(s) with a transaction open longer than asked"]
    for r in rows:
        lines.append(
            f"  {r['shard']:<8} pid={r['pid']:<7} {r['application_name'] or '-':<16} {r['state']:<20} "
            f"xact={r['xact_s']:.0f}s blocks={r['blocked_count']} waits={r['wait_event_type'] or '-'} "
            f"query={r['query']!r}"
        )
    lines += [f"  WARNING shard not read: {u}" for u in unreadable]
    return "\n".join(lines)


async def terminate_blockers(target: Target, *, older_than_s: float, yes: bool) -> int:
    rows, unreadable = await sessions(target, older_than_s=older_than_s)
    for u in unreadable:
        print(f"WARNING shard not read: {u}")
    blockers = [r for r in rows if r["blocking"] or r["state"].startswith("idle in transaction")]
    if not blockers:
        print(f"no session older than {older_than_s:g}s blocks another or idles in a transaction; nothing to do")
        return 0
    plan = [f"terminate {r['shard']} pid {r['pid']} ({r['application_name'] or 'no application name'}, "
            f"transaction open {r['xact_s']:.0f}s, blocking {r['blocked_count']}); its transaction rolls back"
            for r in blockers]
    if not confirm(plan, yes):
        return 0
    by_shard: dict[str, list[int]] = {}
    for r in blockers:
        by_shard.setdefault(r["shard"], []).append(r["pid"])

    async def end(conn: asyncpg.Connection, shard: str) -> int:
        done = await conn.fetch("select pg_terminate_backend(pid) as ok from unnest($1::int[]) pid", by_shard[shard])
        return sum(1 for d in done if d["ok"])

    results = await each_shard(target, end, sorted(by_shard))
    ended = sum(r.value or 0 for r in results)
    print(f"terminated {ended} session(s)")
    return ended
