"""`txroute bench audit`: how long `txroute audit` takes on one shard with a million entries, full and
incremental.

A fresh durable cluster gets one shard, seeded in SQL with generate_series (fast, and valid for every check):
N customer accounts, one deposit each, then same-shard transfers between them until the journal holds
`--entries` entries, every transfer with its two entries, a running `balance_after` per account, and its
stored idempotent response. The seed is dated an hour back, so the first (full) audit can checkpoint all of
it. Then: a full audit (recompute everything, write the checkpoint); `--delta` more entries; an incremental
audit (checkpoint + delta); an incremental audit with nothing new; a second full audit (warm cache).
The last line with `--json` is one JSON object of the figures.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import asyncpg

from app.ops.audit import AuditReport, audit
from app.topology.loader import load_topology
from benchmarks.common import fresh_cluster

DEPOSIT_MINOR = 1_000_000_000
ACCOUNTS = 10_000
CURRENCY = "EUR"
CLIENT = "bench"

# Transfers $1..$2 of the seed ($4 accounts, numbered 0..$4-1, account k in slot $3 + k % $7, owned by client
# $8): the first $4 transfers are one deposit per account, the rest move 1..100 between two of its accounts.
# A transfer's id embeds the slot of the account whose shard books it (the credit of a deposit, the debit of a
# transfer), as the ledger's own ids do. Entry ids are $9 + 2n-1 (debit) and $9 + 2n (credit), so each
# account's entries are in id order. The first statement takes every parameter; the others read its table.
_SEED = [
    """create temp table seed_transfers on commit drop as
       select n, kind, amount, $8::text as client, $9::bigint + 2 * n - 1 as debit_entry,
              case when debit < 0 then 'set_' || $5::text || '_EUR'
                   else 'acc_' || lpad(to_hex($3::integer + (debit % $7)::integer), 3, '0')
                        || lpad(debit::text, 26, '0') end as debit,
              'acc_' || lpad(to_hex($3::integer + (credit % $7)::integer), 3, '0') || lpad(credit::text, 26, '0')
                  as credit,
              'trf_' || lpad(to_hex($3::integer + (booked % $7)::integer), 3, '0') || lpad(n::text, 26, '0') as id,
              $3::integer + (booked % $7)::integer as slot
       from (select n, kind, amount, debit, booked,
                    -- a transfer from an account to itself (n*7 = n*13+1 mod N) goes to the next account instead
                    case when credit = debit then (n * 13 + 2) % $4::bigint else credit end as credit
             from (select n,
                          case when n <= $4::bigint then 'deposit' else 'transfer' end as kind,
                          case when n <= $4::bigint then -1 else n * 7 % $4::bigint end as debit,
                          case when n <= $4::bigint then n - 1 else (n * 13 + 1) % $4::bigint end as credit,
                          case when n <= $4::bigint then n - 1 else n * 7 % $4::bigint end as booked,
                          case when n <= $4::bigint then $6::bigint else 1 + n % 100 end as amount
                   from generate_series($1::bigint, $2::bigint) n) raw) x""",
    """insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, state, created_at)
       select id, client, kind, debit, credit, amount, 'EUR', 'posted', now() - interval '1 hour'
       from seed_transfers""",
    """insert into entries (id, transfer_id, account_id, amount, balance_after, created_at)
       select e.id, e.transfer_id, e.account_id, e.amount,
              a.balance + sum(e.amount) over (partition by e.account_id order by e.id), now() - interval '1 hour'
       from (select debit_entry as id, id as transfer_id, debit as account_id, -amount as amount
             from seed_transfers
             union all
             select debit_entry + 1, id, credit, amount from seed_transfers) e
       join accounts a on a.id = e.account_id""",
    """update accounts a set balance = a.balance + d.total, version = a.version + d.n
       from (select account_id, sum(amount) as total, count(*) as n from entries
             where id between (select min(debit_entry) from seed_transfers)
                          and (select max(debit_entry) + 1 from seed_transfers)
             group by account_id) d
       where d.account_id = a.id""",
    """insert into idempotency (client, key, fingerprint, status_code, body, created_at, slot)
       select client, 'seed-' || id, 'seed', 201,
              jsonb_build_object('id', id, 'kind', kind, 'amount', amount, 'currency', 'EUR', 'state', 'posted'),
              now() - interval '1 hour', slot
       from seed_transfers""",
    "select setval('entries_id_seq', (select max(id) from entries))",
]


async def seed(
    dsn: str, shard: str, *, slot_lo: int, slots: int = 1, accounts: int = ACCOUNTS, first: int, last: int,
    client: str = CLIENT, entry_base: int = 0,
) -> None:
    """Seed `shard` (as its owner) with valid ledger data in set-based SQL: with `first` == 1, `accounts`
    customer accounts of `client` spread over slots `slot_lo`.. `slot_lo + slots - 1` (and the shard's EUR
    settlement account); then transfers `first`..`last`, each with its two entries, a running `balance_after`
    per account and its stored idempotent response, dated an hour back. Entry ids start after `entry_base`
    (another seed's last entry id, when several are seeded in one shard)."""
    assert 1 <= slots and 0 <= slot_lo and slot_lo + slots <= 4096 and 1 <= first <= last
    conn = await asyncpg.connect(dsn, command_timeout=3_600)
    try:
        async with conn.transaction():
            # Seeding as the owner with triggers off (the zero-sum check would run per entry); the audit then
            # checks what the triggers would have.
            await conn.execute("set local session_replication_role = replica")
            if first == 1:
                await conn.execute(
                    """insert into accounts (id, slot, kind, owner_client, currency)
                       select 'acc_' || lpad(to_hex($1::integer + n % $2::integer), 3, '0') || lpad(n::text, 26, '0'),
                              $1::integer + n % $2::integer, 'customer', $5::text, 'EUR'
                       from generate_series(0, $3::integer - 1) n
                       union all select 'set_' || $4::text || '_EUR', $1::integer, 'settlement', 'txroute', 'EUR'
                       on conflict (id) do nothing""",
                    slot_lo, slots, accounts, shard, client,
                )
            args = [first, last, slot_lo, accounts, shard, DEPOSIT_MINOR, slots, client, entry_base]
            for statement in _SEED:
                used = max((int(n) for n in re.findall(r"\$(\d)", statement)), default=0)
                await conn.execute(statement, *args[:used])
        await conn.execute("analyze")
    finally:
        await conn.close()


@dataclass
class Timed:
    name: str
    seconds: float
    report: AuditReport

    def line(self) -> str:
        counts = self.report.counts
        return (f"{self.name:<34} {self.seconds:>8.2f} s  entries {counts.get('entries', 0):>9}  "
                f"transfers checked {counts.get('transfers_checked', 0):>7}  "
                f"{'clean' if self.report.clean else 'VIOLATIONS'}")


async def _timed(name: str, dsns: dict[str, str], *, full: bool) -> Timed:
    started = time.perf_counter()
    report = await audit(dsns, full=full)
    return Timed(name, time.perf_counter() - started, report)


async def _measure(dsn: str, shard: str, slot_lo: int, entries: int, delta: int) -> list[Timed]:
    transfers = entries // 2
    started = time.perf_counter()
    await seed(dsn, shard, slot_lo=slot_lo, first=1, last=transfers)
    print(f"seeded {entries} entries ({transfers} transfers, {ACCOUNTS} accounts) in "
          f"{time.perf_counter() - started:.1f} s")
    dsns = {shard: dsn}
    runs = [await _timed("full (cold, writes the checkpoint)", dsns, full=True)]
    await seed(dsn, shard, slot_lo=slot_lo, first=transfers + 1, last=transfers + delta // 2)
    runs.append(await _timed(f"incremental ({delta} new entries)", dsns, full=False))
    runs.append(await _timed("incremental (nothing new)", dsns, full=False))
    runs.append(await _timed("full (warm)", dsns, full=True))
    return runs


def run(*, entries: int, delta: int, as_json: bool) -> int:
    assert 2 * ACCOUNTS <= entries <= 20_000_000 and 2 <= delta <= 1_000_000
    topology = load_topology()
    shard = topology.shards[0]
    cluster = fresh_cluster("bench-audit")
    try:
        cluster.provision([shard])  # as the owner, as everywhere (the audit reads as the owner too)
        print(f"txroute bench audit: one shard ({shard.name}), {entries} entries, then {delta} more")
        runs = asyncio.run(_measure(cluster.dsn(shard.database), shard.name, shard.slots[0].lo, entries, delta))
    finally:
        cluster.stop()
    for timed in runs:
        print(timed.line())
    figures = {
        "entries": entries,
        "delta_entries": delta,
        "full_cold_s": round(runs[0].seconds, 2),
        "incremental_delta_s": round(runs[1].seconds, 2),
        "incremental_nothing_new_s": round(runs[2].seconds, 2),
        "full_warm_s": round(runs[3].seconds, 2),
        "clean": all(t.report.clean for t in runs),
        "modes": [t.report.modes[shard.name] for t in runs],
    }
    if as_json:
        print(json.dumps(figures))
    if not figures["clean"]:
        for timed in runs:
            print(timed.report.text())
    return 0 if figures["clean"] else 1
