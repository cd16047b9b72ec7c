"""`txroute ops webhooks list|retry|enable` (issue 13): webhook endpoints, their backlog and why any is disabled.

`retry` makes an endpoint's pending and failed deliveries due now with their schedule restarted; `enable`
re-enables a disabled endpoint (its failed deliveries are retried with it). Neither touches money, events or
secrets; deliveries are at least once, so a receiver may see an event again under the same webhook-id.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.ops.target import OpsError, Target, confirm, each_shard

_ENDPOINTS = """
    select w.id, w.client, w.url, w.state, w.disabled_reason, w.disabled_at,
           count(d.event_id) filter (where d.state = 'pending') as pending,
           count(d.event_id) filter (where d.state = 'failed') as failed,
           coalesce(extract(epoch from clock_timestamp()
                             - min(d.event_created_at) filter (where d.state = 'pending')), 0)::float as oldest_s
    from webhook_endpoints w left join webhook_deliveries d on d.endpoint_id = w.id
    where ($1::text is null or w.client = $1) and (not $2 or w.state = 'disabled')
    group by w.id order by w.state, w.id
    limit $3"""
LIST_ROWS_MAX = 1_000


async def endpoints(
    target: Target, *, client: str | None = None, disabled_only: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every endpoint (or a client's, or the disabled ones) with its backlog; and shards not read."""

    async def read(conn: asyncpg.Connection, shard: str) -> list[dict[str, Any]]:
        rows = await conn.fetch(_ENDPOINTS, client, disabled_only, LIST_ROWS_MAX)
        return [{"shard": shard, **{k: (v.isoformat() if hasattr(v, "isoformat") else v)
                                    for k, v in dict(r).items()}} for r in rows]

    results = await each_shard(target, read)
    return [row for r in results if r.value for row in r.value], [f"{r.shard}: {r.error}" for r in results if r.error]


def list_text(rows: list[dict[str, Any]], unreadable: list[str]) -> str:
    disabled = sum(1 for r in rows if r["state"] == "disabled")
    lines = [f"{len(rows)} webhook endpoint(s), {disabled} disabled"]
    for r in rows:
        why = f"  DISABLED: {r['disabled_reason']} at {r['disabled_at']}" if r["state"] == "disabled" else ""
        lines.append(f"  {r['id']}  client={r['client']}  {r['url']}  pending={r['pending']} failed={r['failed']} "
                     f"oldest={r['oldest_s']:.0f}s{why}")
    lines += [f"  WARNING shard not read: {u}" for u in unreadable]
    return "\n".join(lines)


async def _locate(target: Target, endpoint_id: str) -> str:
    rows, unreadable = await endpoints(target)
    found = [r["shard"] for r in rows if r["id"] == endpoint_id]
    if not found:
        raise OpsError(f"no readable shard holds webhook endpoint {endpoint_id}"
                       + (f" (not read: {unreadable})" if unreadable else ""))
    return str(found[0])


async def retry(target: Target, endpoint_id: str, *, enable: bool, yes: bool) -> int:
    """Make the endpoint's pending and failed deliveries due now (and, with `enable`, enable it)."""
    shard = await _locate(target, endpoint_id)
    plan = [f"make the pending and failed deliveries of {endpoint_id} (on {shard}) due now, schedule restarted"]
    if enable:
        plan.insert(0, f"enable webhook endpoint {endpoint_id} again (its disabled reason is cleared)")
    if not confirm(plan, yes):
        return 0

    async def act(conn: asyncpg.Connection, _shard: str) -> int:
        async with conn.transaction():
            if enable:
                await conn.execute("select txr_webhook_set_state($1, 'enabled', null)", endpoint_id)
            return int(await conn.fetchval("select txr_webhook_retry($1)", endpoint_id))

    (result,) = await each_shard(target, act, [shard])
    if result.error:
        raise OpsError(f"{shard}: {result.error}")
    print(f"{'enabled, and ' if enable else ''}made {result.value} deliver(ies) due now")
    return int(result.value)
