"""`txroute ops status`: one page a responder reads first. Per region: its service and router health and
whether it is drained; per shard: reachability, the slots it claims (epoch, state), its saga backlog
(outbox), sessions waiting on locks, the oldest open transaction, and the last audit it recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx

from app.ops.target import Target, each_shard

HTTP_TIMEOUT_S = 2.0


async def _shard(conn: asyncpg.Connection, shard: str) -> dict[str, Any]:
    slots = await conn.fetch("select slot_lo, slot_hi, epoch, state from slot_ownership order by slot_lo")
    info = await conn.fetchrow("select region, draining_since, drain_reason from shard_info")
    backlog = await conn.fetchrow(
        """select count(*) as pending,
                  coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0)::float as oldest_s,
                  coalesce(max(attempts), 0) as attempts_max
           from outbox where delivered_at is null"""
    )
    sessions = await conn.fetchrow(
        """select count(*) filter (where wait_event_type = 'Lock') as waiting_on_locks,
                  coalesce(max(extract(epoch from clock_timestamp() - xact_start))
                           filter (where pid <> pg_backend_pid()), 0)::float as oldest_xact_s
           from pg_stat_activity where datname = current_database() and state <> 'idle'"""
    )
    last_audit = None
    if await conn.fetchval("select to_regclass('audit_runs') is not null"):
        row = await conn.fetchrow("select finished_at, clean, violations from audit_runs order by id desc limit 1")
        if row is not None:
            last_audit = {"at": row["finished_at"].isoformat(), "clean": row["clean"],
                          "violations": row["violations"]}
    return {
        "region": info["region"],
        "slots": [f"{r['slot_lo']}-{r['slot_hi']} epoch {r['epoch']} {r['state']}" for r in slots],
        "draining": info["draining_since"] is not None,
        "drain_reason": info["drain_reason"],
        "outbox_pending": backlog["pending"],
        "outbox_oldest_s": round(backlog["oldest_s"], 1),
        "outbox_attempts_max": backlog["attempts_max"],
        "sessions_waiting_on_locks": sessions["waiting_on_locks"],
        "oldest_transaction_s": round(sessions["oldest_xact_s"], 1),
        "last_audit": last_audit,
    }


async def _readyz(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        answer = await http.get(url + "/readyz")
    except httpx.HTTPError as exc:
        return {"url": url, "ready": False, "error": type(exc).__name__}
    try:
        body = answer.json()
    except ValueError:
        body = {}
    return {"url": url, "ready": answer.status_code == 200, **({"detail": body} if isinstance(body, dict) else {})}


async def gather(target: Target) -> dict[str, Any]:
    shards = await each_shard(target, _shard)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, verify=target.tls()) as http:
        regions = await asyncio.gather(*(_readyz(http, u) for u in target.region_urls.values()))
        routers = await asyncio.gather(*(_readyz(http, u) for u in target.router_urls))
    pids: dict[str, Any] = {}
    if target.stack is not None:
        from app.local import stack as local_stack

        pids = {row["name"]: row["pid"] for row in local_stack.status(target.stack)}
    doc: dict[str, Any] = {"regions": {}, "routers": [], "shards": {}}
    for name, health in zip(target.region_urls, regions, strict=True):
        doc["regions"][name] = {"service": health, "pid": pids.get(f"region-{name}")}
    for health in routers:
        draining = health.get("detail", {}).get("draining", [])
        doc["routers"].append({"url": health["url"], "ready": health["ready"], "draining": draining,
                               "pid": pids.get("router")})
    for result in shards:
        doc["shards"][result.shard] = (
            {"region": target.region_of(result.shard), "reachable": False, "error": result.error}
            if result.error else {"reachable": True, **result.value}
        )
    return doc


def text(doc: dict[str, Any]) -> str:
    lines = ["regions:"]
    for name, region in doc["regions"].items():
        service = region["service"]
        shards = {k: v for k, v in doc["shards"].items() if v["region"] == name}
        drained = any(v.get("draining") for v in shards.values())
        pid = f" pid={region['pid']}" if region.get("pid") else ""
        state = "ready" if service["ready"] else "NOT READY"
        lines.append(f"  {name:<12} {state:<10} {'DRAINING ' if drained else ''}{service['url']}{pid}")
    for router in doc["routers"]:
        state = "ready" if router["ready"] else "NOT READY"
        learnt = f" draining={','.join(router['draining'])}" if router["draining"] else ""
        lines.append(f"  router       {state:<10} {router['url']}{learnt}")
    lines.append("shards:")
    for name, shard in doc["shards"].items():
        if not shard["reachable"]:
            lines.append(f"  {name:<8} {shard['region']:<12} UNREACHABLE {shard['error']}")
            continue
        audit = shard["last_audit"]
        audit_text = "never" if audit is None else (
            f"{'clean' if audit['clean'] else str(audit['violations']) + ' violation(s)'} at {audit['at']}")
        lines.append(
            f"  {name:<8} {shard['region']:<12} slots {'; '.join(shard['slots'])}"
            + (f"  DRAINING ({shard['drain_reason']})" if shard["draining"] else "")
        )
        lines.append(
            f"           outbox pending={shard['outbox_pending']} oldest={shard['outbox_oldest_s']}s "
            f"attempts_max={shard['outbox_attempts_max']}  lock_waits={shard['sessions_waiting_on_locks']} "
            f"oldest_xact={shard['oldest_transaction_s']}s  last_audit={audit_text}"
        )
    return "\n".join(lines)
