"""`txroute ops sagas list|inspect|retry`: cross-shard transfers still in the outbox (DESIGN D6).

`retry` only makes messages due now (`next_attempt_at = now()`) so the relay delivers them on its next
poll; it never touches money, states or entries. A dead-lettered message (issue 10: it failed
SAGA_POISON_FAILURES_MAX times in a way waiting cannot heal; its money is still in transit) is listed as
such, and `retry` puts it back in the queue with its failure count reset, once its cause is fixed.
A message the relay holds (leased) may then be sent twice: the destination's inbox applies it once.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.ops.target import OpsError, Target, confirm, each_shard

_PENDING = """
    select o.transfer_id, o.destination_shard, o.destination_region, o.attempts, o.failures, o.last_error,
           o.dead_lettered_at is not null as dead_lettered,
           extract(epoch from clock_timestamp() - o.created_at)::float as age_s,
           greatest(extract(epoch from o.next_attempt_at - clock_timestamp()), 0)::float as next_attempt_in_s,
           t.amount, t.currency, t.state
    from outbox o join transfers t on t.id = o.transfer_id
    where o.delivered_at is null and o.created_at <= clock_timestamp() - make_interval(secs => $1)
    order by o.created_at
    limit $2"""
LIST_ROWS_MAX = 1_000


async def pending(target: Target, *, older_than_s: float = 0.0) -> tuple[list[dict[str, Any]], list[str]]:
    """Undelivered messages older than `older_than_s`, oldest first; and the shards that could not be read."""

    async def read(conn: asyncpg.Connection, shard: str) -> list[dict[str, Any]]:
        rows = await conn.fetch(_PENDING, older_than_s, LIST_ROWS_MAX)
        return [{"source_shard": shard, **dict(r)} for r in rows]

    results = await each_shard(target, read)
    rows = [row for r in results if r.value for row in r.value]
    rows.sort(key=lambda r: -r["age_s"])
    return rows, [f"{r.shard}: {r.error}" for r in results if r.error]


def list_text(rows: list[dict[str, Any]], unreadable: list[str]) -> str:
    dead = sum(1 for r in rows if r["dead_lettered"])
    lines = [f"{len(rows)} saga message(s) waiting in outboxes, {dead} of them dead-lettered"]
    for r in rows:
        status = (f"DEAD-LETTER after {r['failures']} failures" if r["dead_lettered"]
                  else f"next_in={r['next_attempt_in_s']:.0f}s")
        lines.append(
            f"  {r['transfer_id']}  {r['source_shard']} -> {r['destination_shard']} ({r['destination_region']})  "
            f"{r['amount']} {r['currency']}  age={r['age_s']:.0f}s attempts={r['attempts']} "
            f"{status}  last_error={r['last_error'] or '-'}"
        )
    lines += [f"  WARNING shard not read: {u}" for u in unreadable]
    return "\n".join(lines)


async def inspect(target: Target, transfer_id: str) -> dict[str, Any]:
    """Everything each shard knows about one transfer: state, history, outbox attempts, inbox outcome."""

    async def read(conn: asyncpg.Connection, shard: str) -> dict[str, Any] | None:
        transfer = await conn.fetchrow(
            """select id, kind, debit_account, credit_account, amount, currency, state, reason, debit_shard,
                      credit_shard, created_at from transfers where id = $1""", transfer_id)
        outbox = await conn.fetchrow(
            """select destination_shard, destination_region, attempts, failures, last_error, created_at,
                      next_attempt_at, delivered_at, dead_lettered_at from outbox where transfer_id = $1""",
            transfer_id)
        inbox = await conn.fetchrow(
            "select source_shard, outcome, reason, received_at from inbox where transfer_id = $1", transfer_id)
        if transfer is None and outbox is None and inbox is None:
            return None
        events = await conn.fetch(
            "select seq, state, reason, at from transfer_events where transfer_id = $1 order by seq", transfer_id)
        return {
            "transfer": _plain(transfer), "history": [_plain(e) for e in events],
            "outbox": _plain(outbox), "inbox": _plain(inbox),
        }

    results = await each_shard(target, read)
    found = {r.shard: r.value for r in results if r.value is not None}
    unreadable = [f"{r.shard}: {r.error}" for r in results if r.error]
    if not found and not unreadable:
        raise OpsError(f"no shard knows transfer {transfer_id}")
    return {"transfer_id": transfer_id, "shards": found, "unreadable": unreadable}


def _plain(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}


def inspect_text(doc: dict[str, Any]) -> str:
    lines = [f"transfer {doc['transfer_id']}"]
    for shard, view in doc["shards"].items():
        lines.append(f"  at {shard}:")
        t = view["transfer"]
        if t:
            lines.append(f"    {t['kind']} {t['amount']} {t['currency']} {t['debit_account']} -> {t['credit_account']}"
                         f"  state={t['state']}{' (' + t['reason'] + ')' if t['reason'] else ''}")
        for e in view["history"]:
            lines.append(f"    history {e['seq']}: {e['state']}{' ' + e['reason'] if e['reason'] else ''} at {e['at']}")
        o = view["outbox"]
        if o:
            delivered = (f"delivered at {o['delivered_at']}" if o["delivered_at"]
                         else f"DEAD-LETTER since {o['dead_lettered_at']} after {o['failures']} failures"
                         if o["dead_lettered_at"] else f"next attempt {o['next_attempt_at']}")
            lines.append(f"    outbox -> {o['destination_shard']} ({o['destination_region']}): attempts={o['attempts']}"
                         f" {delivered}; last error: {o['last_error'] or '-'}")
        i = view["inbox"]
        if i:
            lines.append(f"    inbox from {i['source_shard']}: {i['outcome']}"
                         f"{' (' + i['reason'] + ')' if i['reason'] else ''} at {i['received_at']}")
    lines += [f"  WARNING shard not read: {u}" for u in doc["unreadable"]]
    return "\n".join(lines)


async def retry(
    target: Target, *, transfer_ids: list[str], all_stuck: bool, older_than_s: float, yes: bool
) -> int:
    """Make the named (or all stuck) messages due now. Returns how many were made due."""
    if all_stuck:
        rows, unreadable = await pending(target, older_than_s=older_than_s)
        chosen = [(r["source_shard"], r["transfer_id"]) for r in rows]
    else:
        rows, unreadable = await pending(target)
        by_id = {r["transfer_id"]: r["source_shard"] for r in rows}
        missing = [t for t in transfer_ids if t not in by_id]
        if missing:
            raise OpsError(f"not waiting in any readable outbox: {missing} (delivered already, or unknown)")
        chosen = [(by_id[t], t) for t in transfer_ids]
    for u in unreadable:
        print(f"WARNING shard not read: {u}")
    plan = [f"make {len(chosen)} outbox message(s) due now (dead letters among them back in the queue), so the "
            "relay delivers them on its next poll (no money, state or entry changes)"]
    plan += [f"{t} (outbox of {s})" for s, t in chosen[:20]] + (["..."] if len(chosen) > 20 else [])
    if not chosen:
        print("nothing to retry")
        return 0
    if not confirm(plan, yes):
        return 0
    by_shard: dict[str, list[str]] = {}
    for shard, transfer in chosen:
        by_shard.setdefault(shard, []).append(transfer)

    async def due(conn: asyncpg.Connection, shard: str) -> int:
        status = await conn.execute(
            """update outbox set next_attempt_at = clock_timestamp(), dead_lettered_at = null, failures = 0
               where transfer_id = any($1::text[]) and delivered_at is null""", by_shard[shard])
        return int(status.split()[-1])

    results = await each_shard(target, due, sorted(by_shard))
    for r in results:
        if r.error:
            print(f"WARNING {r.shard}: {r.error}; its messages were not made due")
    made_due = sum(r.value or 0 for r in results)
    print(f"made {made_due} message(s) due now")
    return made_due
