"""`txroute audit`: a global reconciliation over every shard (DESIGN D4, D5, D6).

Per shard (exact, in one REPEATABLE READ snapshot of that shard):
    balance_equals_entries   each account's balance is the sum of its entries
    balance_after_chain      each entry's balance_after is the previous one's plus its amount (per account)
    transfer_zero_sum        each transfer's entries sum to zero
    entries_match_transfer   each transfer has exactly the entries its kind and state call for: accounts,
                             amounts, count, and the transfer's currency on every account
    idempotency_matches      a stored success response agrees with its transfer's (or account's) state now
    transit_account_name     a transit account is named trn_<this shard>_<peer shard>_<its currency>
    held_equals_open_holds   each account's `held` is the sum of its open holds (DESIGN D14, migration 0009)
    available_not_negative   each customer's balance - what its unexpired holds reserve + overdraft >= 0
    shard_zero_sum, balance_within_limit, money_conserved (customers + range + transit = deposits - withdrawals)

Across shards, per saga (DESIGN D6): posted_has_credit, returned_not_credited, credit_has_debit (a credit
matches its debit: source shard, amount, currency and credit account), and
transit_matches_in_flight: a saga's transit entries on every shard add up to its amount while it is in
flight (neither applied by the credit side nor returned, whatever its state is called), else to zero.
Summed over sagas, this and balance_equals_entries give the pairwise invariant of D6 (transit balances =
messages in flight), plus what slot moves carried.

Slot moves (issue 11, migration 0008) keep every check as it is: a move books balancing postings (kind `move`)
on both shards against their transit accounts, so each shard's customers + transit still equal its own
deposits - withdrawals. The source books the range out in one posting per currency, against its range account
(kind `range`, migration 0028), which stands for the range's customer accounts until the cleanup books each to
zero against it: range accounts count with the customers. Transfers copied to the new owner (`moved_from`)
carry no entries there and are not counted again as its deposits; a saga re-addressed to a moved slot's new
owner is summed over every shard.

Live traffic: every shard is read in parallel, each in its own snapshot, so a saga may have moved between
two reads. The audit therefore judges a saga only as of a watermark W = (the earliest shard clock at its
read) - AUDIT_WATERMARK_MARGIN_S: a saga is judged only when every step it shows (debit, apply, settle,
each stamped by the database that wrote it) is older than W, and is deferred to the next run otherwise.
This is exact when the margin exceeds both the longest ledger transaction (then every step older than W is
visible in its shard's snapshot) and the clock skew between shard databases (then a visible step implies
its causal predecessor, on another shard, is visible too). What it relies on: one clock for the local stack;
NTP-disciplined clocks within the margin (10 s) for deployed regions. Skew beyond the margin could report a
saga half-seen; it can never hide a violation for longer than it takes the saga to age past the watermark.

Large shards are incremental: a clean run stores a checkpoint per shard (migration 0007: per account its
balance, entry count, last entry id and totals as of an entry-id horizon); the next run reads only entries
after the horizon, the transfers they belong to and the sagas deferred or still in flight. What only a full
run checks: entries already under the checkpoint (trusted as append-only, `entries_append_only`, except the
last one per account, which is re-read), transfers left without any entry, and the stored responses of
same-shard transfers (written once, with the transfer). `full=True` (`--full`) recomputes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from app import limits

FULL = "full"
INCREMENTAL = "incremental"
_TRANSIT = re.compile(r"^trn_([a-z0-9]+-[a-z0-9]+)_([a-z0-9]+-[a-z0-9]+)_([A-Z]{3})$")
# Checks whose violations keep a shard's checkpoint where it was (the next run reads the same delta again).
_LOCAL_CHECKS = frozenset({
    "held_equals_open_holds", "available_not_negative",
    "balance_equals_entries", "balance_after_chain", "transfer_zero_sum", "entries_match_transfer",
    "idempotency_matches", "transit_account_name", "shard_zero_sum", "balance_within_limit", "money_conserved",
})


@dataclass
class Violation:
    check: str
    detail: str
    shard: str | None = None  # the shard whose own data shows it (None: across shards)


@dataclass
class AuditReport:
    shards: list[str]
    violations: list[Violation] = field(default_factory=list)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)  # currency -> figure -> amount
    counts: dict[str, int] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)  # shard -> full | incremental
    watermark: dt.datetime | None = None
    unsaved: list[str] = field(default_factory=list)  # shards whose checkpoint could not be written

    @property
    def clean(self) -> bool:
        return not self.violations

    def text(self) -> str:
        lines = [f"txroute audit: {len(self.shards)} shards ({', '.join(self.shards)})"]
        if self.modes:
            lines.append("  mode: " + ", ".join(f"{s} {m}" for s, m in sorted(self.modes.items())))
        if self.watermark is not None:
            lines.append(f"  sagas judged as of {self.watermark.isoformat()}")
        lines += [f"  {name}: {value}" for name, value in sorted(self.counts.items())]
        for currency, figures in sorted(self.totals.items()):
            lines.append(f"  {currency}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        if self.unsaved:
            lines.append(f"  checkpoint not written in {', '.join(self.unsaved)}: their next run reads more")
        if self.clean:
            lines.append("OK: no violation")
        else:
            lines.append(f"FAILED: {len(self.violations)} violation(s)")
            lines += [f"  [{v.check}] {v.detail}" for v in self.violations]
        return "\n".join(lines)

    def add(self, check: str, detail: str, shard: str | None = None) -> None:
        self.violations.append(Violation(check, detail, shard))

    def count(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + value


@dataclass
class _Checkpoint:
    horizon: int  # every entry with id <= horizon is summed in `accounts`
    accounts: list[tuple[str, int, int, int | None, int, int]]  # id, balance, count, last id, debits, credits
    previous: int | None  # the horizon this run started from (None: no checkpoint, or --full)


@dataclass
class _Shard:
    name: str
    conn: asyncpg.Connection
    mode: str = FULL
    now: dt.datetime | None = None
    check_ids: set[str] = field(default_factory=set)  # transfers whose sagas this run looks at (incremental)
    checkpoint: _Checkpoint | None = None
    nonterminal: frozenset[str] = frozenset()
    sagas_out: dict[str, asyncpg.Record] = field(default_factory=dict)  # transfers debited here to another shard
    inbox: dict[str, asyncpg.Record] = field(default_factory=dict)  # messages received from other shards
    transit: dict[str, int] = field(default_factory=dict)  # transfer id -> its entries on transit accounts


async def audit(
    shard_dsns: dict[str, str],
    *,
    full: bool = False,
    margin_s: float = limits.AUDIT_WATERMARK_MARGIN_S,
    save_checkpoint: bool = True,
) -> AuditReport:
    """Read every shard and check the invariants; `shard_dsns` maps shard name to its database DSN.

    Incremental from each shard's checkpoint unless `full`; a shard without violations of its own gets a
    new checkpoint unless `save_checkpoint` is false."""
    assert margin_s > 0, "the watermark needs a margin (see the module docstring)"
    report = AuditReport(shards=sorted(shard_dsns))
    async with contextlib.AsyncExitStack() as stack:
        shards = list(await asyncio.gather(*(
            _open(stack, name, dsn) for name, dsn in sorted(shard_dsns.items())
        )))
        await asyncio.gather(*(_read_local(s, report, full=full, margin_s=margin_s) for s in shards))
        # A shard without a checkpoint reads every saga, so every other shard must read their other sides.
        ids = None if any(s.mode == FULL for s in shards) else set().union(*(s.check_ids for s in shards))
        await asyncio.gather(*(_read_sagas(s, ids) for s in shards))
    report.modes = {s.name: s.mode for s in shards}
    report.watermark = min(s.now for s in shards if s.now is not None) - dt.timedelta(seconds=margin_s)
    deferred = _check_sagas(shards, report, report.watermark)
    if save_checkpoint:
        saved = await asyncio.gather(*(_save(s, shard_dsns[s.name], report, deferred) for s in shards),
                                     return_exceptions=True)
        # A checkpoint is an optimisation: the audit's result stands without it (it is not a violation).
        report.unsaved = [s.name for s, result in zip(shards, saved, strict=True)
                          if isinstance(result, (OSError, TimeoutError, asyncpg.PostgresError))]
        for result in saved:
            if isinstance(result, BaseException) and not isinstance(
                result, (OSError, TimeoutError, asyncpg.PostgresError)
            ):
                raise result
    return report


async def _open(stack: contextlib.AsyncExitStack, name: str, dsn: str) -> _Shard:
    conn = await asyncpg.connect(dsn, timeout=limits.DB_CONNECT_TIMEOUT_S, command_timeout=limits.AUDIT_QUERY_TIMEOUT_S)
    stack.push_async_callback(conn.close)
    transaction = conn.transaction(isolation="repeatable_read", readonly=True)
    await transaction.start()
    stack.push_async_callback(transaction.rollback)
    return _Shard(name, conn)


# Per shard --------------------------------------------------------------------------------------------


async def _read_local(shard: _Shard, report: AuditReport, *, full: bool, margin_s: float) -> None:
    conn = shard.conn
    shard.now = await conn.fetchval("select now()")  # the snapshot's own clock: no skew between audit and shard
    shard.nonterminal = frozenset(r["state"] for r in await conn.fetch(
        "select state from transfer_states where not terminal"))
    previous = None if full else await conn.fetchval("select entries_horizon_id from audit_checkpoints")
    shard.mode = FULL if previous is None else INCREMENTAL
    since = previous or 0
    # The new horizon: entries created 2 margins before this snapshot (see migration 0007) are all committed.
    horizon = await conn.fetchval(
        "select coalesce(max(id), 0) from entries where created_at < now() - make_interval(secs => $1)",
        2 * margin_s,
    )
    horizon = max(horizon, since)
    use_checkpoint = previous is not None
    await _check_accounts(shard, report, since, horizon, use_checkpoint, previous)
    await _check_chain(shard, report, since, use_checkpoint)
    ids = None
    if use_checkpoint:
        touched = await conn.fetch("select distinct transfer_id from entries where id > $1", since)
        deferred = await conn.fetch("select transfer_id from audit_deferred")
        in_flight = await conn.fetch("select id from transfers where state = 'pending'")  # a partial index
        # Open holds have no entries and no saga yet: nothing to look at until they are resolved.
        others = sorted(shard.nonterminal - {"pending", "held"})
        if others:
            in_flight += await conn.fetch("select id from transfers where state = any($1::text[])", others)
        ids = {r[0] for r in touched} | {r[0] for r in deferred} | {r[0] for r in in_flight}
        shard.check_ids = ids
    await _check_transfers(shard, report, ids)
    await _check_idempotency(shard, report, ids)
    await _check_holds(shard, report)


async def _check_holds(shard: _Shard, report: AuditReport) -> None:
    """Every account's `held` against its open holds (by state, expired or not yet swept), and what a customer
    can still spend (counting only the holds whose time has not come, as postings do) against zero; for the
    accounts of the slots this shard serves."""
    rows = await shard.conn.fetch(
        """select a.id, a.kind, a.balance, a.held, a.overdraft_limit,
                  coalesce(h.total, 0) as open_total, coalesce(h.live, 0) as live
           from accounts a
           left join (select debit_account, sum(amount) as total,
                             coalesce(sum(amount) filter (where hold_expires_at > now()), 0) as live
                      from transfers where state = 'held' group by debit_account) h on h.debit_account = a.id
           where (a.held <> coalesce(h.total, 0)
                  or (a.kind = 'customer' and a.balance - coalesce(h.live, 0) + a.overdraft_limit < 0))
             -- Only accounts this shard serves: a slot move copies an account before its holds and books its
             -- balance at the switch (migration 0008), and the source keeps the moved account at zero.
             and exists (select 1 from slot_ownership o
                         where a.slot between o.slot_lo and o.slot_hi and o.state <> 'moved')
           order by a.id limit $1""",
        limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
    )
    for r in rows:
        if r["held"] != r["open_total"]:
            report.add("held_equals_open_holds", f"{shard.name}: account {r['id']} holds {r['held']} but its open "
                       f"holds sum to {r['open_total']}", shard.name)
        else:
            report.add("available_not_negative", f"{shard.name}: account {r['id']} has {r['balance']} with "
                       f"{r['live']} held and a limit of {r['overdraft_limit']}: less than nothing available",
                       shard.name)


# Every account against its journal (checkpoint + entries since), in one pass on the server: only what the
# audit reports or stores crosses the wire (violations, per currency and kind figures, changed checkpoint rows).
_ACCOUNTS = """
    with x as materialized (
        select a.id, a.kind, a.currency, a.balance, a.overdraft_limit,
               coalesce(c.balance, 0) + coalesce(d.total, 0) as journal,
               coalesce(c.entries_count, 0) + coalesce(d.n, 0) as entries,
               coalesce(c.debits, 0) + coalesce(d.debits, 0) as debits,
               coalesce(c.credits, 0) + coalesce(d.credits, 0) as credits,
               coalesce(d.n_h, 0) as n_h,
               coalesce(c.balance, 0) + coalesce(d.total_h, 0) as balance_h,
               coalesce(c.entries_count, 0) + coalesce(d.n_h, 0) as entries_h,
               coalesce(d.last_h, c.last_entry_id) as last_h,
               coalesce(c.debits, 0) + coalesce(d.debits_h, 0) as debits_h,
               coalesce(c.credits, 0) + coalesce(d.credits_h, 0) as credits_h
        from accounts a
        left join audit_checkpoint_accounts c on $3 and c.account_id = a.id
        left join (
            select account_id, sum(amount) as total, count(*) as n,
                   coalesce(sum(-amount) filter (where amount < 0), 0) as debits,
                   coalesce(sum(amount) filter (where amount > 0), 0) as credits,
                   coalesce(sum(amount) filter (where id <= $2), 0) as total_h,
                   count(*) filter (where id <= $2) as n_h,
                   max(id) filter (where id <= $2) as last_h,
                   coalesce(sum(-amount) filter (where amount < 0 and id <= $2), 0) as debits_h,
                   coalesce(sum(amount) filter (where amount > 0 and id <= $2), 0) as credits_h
            from entries where id > $1 group by account_id
        ) d on d.account_id = a.id
    )
    (select 'balance' as what, id, kind, currency, balance::numeric as n1, journal as n2,
            null::numeric as n3, null::numeric as n4, null::numeric as n5
     from x where balance <> journal order by id limit $4)
    union all
    (select 'limit', id, kind, currency, balance, overdraft_limit, null, null, null
     from x where kind = 'customer' and balance < -overdraft_limit order by id limit $4)
    union all
    (select 'transit', id, kind, currency, null, null, null, null, null from x where kind = 'transit')
    union all
    (select 'figures', null, kind, currency, sum(balance), sum(debits), sum(credits), sum(entries), count(*)
     from x group by kind, currency)
    union all
    (select 'checkpoint', id, null, null, balance_h, entries_h, last_h, debits_h, credits_h from x where n_h > 0)"""


async def _check_accounts(
    shard: _Shard, report: AuditReport, since: int, horizon: int, use_checkpoint: bool, previous: int | None
) -> None:
    rows = await shard.conn.fetch(_ACCOUNTS, since, horizon, use_checkpoint, limits.AUDIT_VIOLATIONS_PER_CHECK_MAX)
    name = shard.name
    by_currency: dict[str, int] = defaultdict(int)
    figures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    shown: dict[str, int] = defaultdict(int)
    saved: list[tuple[str, int, int, int | None, int, int]] = []
    accounts = entries = 0
    for r in rows:
        what = r["what"]
        if what == "balance":
            report.add("balance_equals_entries", f"{name}: account {r['id']} balance {r['n1']} but its entries "
                       f"sum to {r['n2']}", name)
        elif what == "limit":
            report.add("balance_within_limit", f"{name}: account {r['id']} balance {r['n1']} below its limit", name)
        elif what == "transit":
            _check_transit_name(name, r["id"], r["currency"], report, shown)
        elif what == "figures":
            currency, kind = r["currency"], r["kind"]
            by_currency[currency] += int(r["n1"])
            figures[currency][kind] += int(r["n1"])
            if kind == "settlement":  # a deposit debits the settlement account, a withdrawal credits it
                figures[currency]["deposits_seen"] += int(r["n2"])
                figures[currency]["withdrawals_seen"] += int(r["n3"])
            entries += int(r["n4"])
            accounts += int(r["n5"])
        else:
            assert what == "checkpoint", what
            saved.append((r["id"], int(r["n1"]), int(r["n2"]), None if r["n3"] is None else int(r["n3"]),
                          int(r["n4"]), int(r["n5"])))
    for currency, total_balance in sorted(by_currency.items()):
        if total_balance != 0:
            report.add("shard_zero_sum", f"{name}: {currency} accounts sum to {total_balance}, not 0", name)
    await _check_money(shard, report, figures, use_checkpoint)
    if use_checkpoint:
        # The checkpoint's last entry per account must still be there, unchanged: a cheap look under it.
        moved = await shard.conn.fetch(
            """select c.account_id, c.last_entry_id from audit_checkpoint_accounts c
               left join entries e on e.id = c.last_entry_id
               where c.last_entry_id is not null
                 and (e.id is null or e.account_id <> c.account_id or e.balance_after <> c.balance)
               limit $1""", limits.AUDIT_VIOLATIONS_PER_CHECK_MAX)
        for m in moved:
            report.add("balance_after_chain", f"{name}: account {m['account_id']}'s checkpointed entry "
                       f"{m['last_entry_id']} is gone or changed", name)
    shard.checkpoint = _Checkpoint(horizon, saved, None if not use_checkpoint else previous)
    report.count("accounts", accounts)
    report.count("entries", entries)


def _check_transit_name(shard: str, account: str, currency: str, report: AuditReport, shown: dict[str, int]) -> None:
    m = _TRANSIT.match(account)
    if (m is None or m.group(1) != shard or m.group(2) == shard or m.group(3) != currency) and _show(
        shown, "transit_account_name"
    ):
        report.add("transit_account_name", f"{shard}: transit account {account[:80]!r} is not named "
                   f"trn_{shard}_<peer shard>_{currency}", shard)


async def _check_money(
    shard: _Shard, report: AuditReport, figures: dict[str, dict[str, int]], incremental: bool
) -> None:
    """Per shard, customers plus transit hold what deposits minus withdrawals put there: a saga moves money
    between a customer and a transit account of the same shard in each of its transactions."""
    if not incremental:  # from the transfers themselves; incrementally, from the settlement accounts' entries
        # Posted only: a withdrawal hold moves no money while held, nor once voided or expired.
        for r in await shard.conn.fetch(
            """select currency, kind, sum(amount)::bigint as total from transfers
               where kind in ('deposit', 'withdrawal') and state = 'posted' and moved_from is null
               group by currency, kind"""
        ):
            figures[r["currency"]][r["kind"] + "s"] += int(r["total"])
    for currency, f in sorted(figures.items()):
        deposits = f["deposits"] if not incremental else f["deposits_seen"]
        withdrawals = f["withdrawals"] if not incremental else f["withdrawals_seen"]
        held = f["customer"] + f["range"] + f["transit"]  # range: a moved range not yet booked out (0028)
        totals = report.totals.setdefault(currency, defaultdict(int))
        for key, value in (("deposits", deposits), ("withdrawals", withdrawals), ("customer", f["customer"]),
                           ("in_transit", f["transit"]), ("settlement", f["settlement"])):
            totals[key] += value
        if held != deposits - withdrawals:
            report.add("money_conserved", f"{shard.name}: {currency}: customers, range and transit accounts hold "
                       f"{held} but deposits minus withdrawals is {deposits - withdrawals}", shard.name)


async def _check_chain(shard: _Shard, report: AuditReport, since: int, use_checkpoint: bool) -> None:
    rows = await shard.conn.fetch(
        """select id, account_id, amount, balance_after, before from (
               select e.id, e.account_id, e.amount, e.balance_after,
                      coalesce(lag(e.balance_after) over (partition by e.account_id order by e.id),
                               c.balance, 0) as before
               from entries e left join audit_checkpoint_accounts c on $2 and c.account_id = e.account_id
               where e.id > $1
           ) x where balance_after - amount <> before
           order by id limit $3""",
        since, use_checkpoint, limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
    )
    for r in rows:
        report.add("balance_after_chain", f"{shard.name}: entry {r['id']} of account {r['account_id']} says "
                   f"{r['balance_after']} after {r['amount']}, but the balance before it was {r['before']}", shard.name)


# What entries each transfer must have, as "account amount currency" lines. A copy made by a slot move (issue 11,
# `moved_from`): none (its journal stayed on the shard it came from). A hold: none while it is held, nor once voided
# or expired (a hold moves nothing). A same-shard transfer (or a move's balancing posting, kind `move`): its two
# accounts. A saga's debit side: the source and the transit account towards the credit shard (and both
# reversed once returned; and, applied by its own source shard after its credit slot moved there, the credit
# against that transit account). Its credit side: the transit account from the source shard and the credit.
_EXPECTED_LINES = """
    case
        when t.moved_from is not null then '{}'::text[]
        when t.state in ('held', 'voided', 'expired') then '{}'::text[]
        when t.debit_shard is null and t.credit_shard is null then array[
            t.debit_account || ' ' || -t.amount || ' ' || t.currency,
            t.credit_account || ' ' || t.amount || ' ' || t.currency]
        when t.debit_shard = s.shard and t.credit_shard <> s.shard then array[
            t.debit_account || ' ' || -t.amount || ' ' || t.currency,
            'trn_' || s.shard || '_' || t.credit_shard || '_' || t.currency || ' ' || t.amount || ' ' || t.currency]
            || case when t.state = 'returned' then array[
            'trn_' || s.shard || '_' || t.credit_shard || '_' || t.currency || ' ' || -t.amount || ' ' || t.currency,
            t.debit_account || ' ' || t.amount || ' ' || t.currency] else '{}'::text[] end
            || case when exists (select 1 from inbox i where i.transfer_id = t.id and i.applied_by_source
                                 and i.outcome = 'applied') then array[
            'trn_' || s.shard || '_' || t.credit_shard || '_' || t.currency || ' ' || -t.amount || ' ' || t.currency,
            t.credit_account || ' ' || t.amount || ' ' || t.currency] else '{}'::text[] end
        when t.credit_shard = s.shard and t.debit_shard <> s.shard then array[
            'trn_' || s.shard || '_' || t.debit_shard || '_' || t.currency || ' ' || -t.amount || ' ' || t.currency,
            t.credit_account || ' ' || t.amount || ' ' || t.currency]
        else array['(no valid shape)'] end"""
_ACTUAL_LINE = "e.account_id || ' ' || e.amount || ' ' || a.currency"

# Expected and actual entries compared as multisets by count and a sum of 64-bit hashes of their lines: one
# hash aggregate over the entries, no sorting (a full run reads millions). The few that differ are then read
# again in full for the report.
_TRANSFERS_DIFFERING = f"""
    with t as (
        select t.id, {_EXPECTED_LINES} as lines
        from transfers t cross join shard_info s where $1 or t.id = any($2::text[])
    ), expected as (
        select id, cardinality(lines) as n,
               (select sum(hashtextextended(x, 0)::numeric) from unnest(lines) x) as fingerprint
        from t
    ), actual as (
        select e.transfer_id, count(*) as n, sum(e.amount) as total,
               sum(hashtextextended({_ACTUAL_LINE}, 0)::numeric) as fingerprint
        from entries e join accounts a on a.id = e.account_id
        where $1 or e.transfer_id = any($2::text[])
        group by e.transfer_id
    )
    select x.id, coalesce(y.total, 0) as total
    from expected x left join actual y on y.transfer_id = x.id
    where x.n <> coalesce(y.n, 0) or x.fingerprint is distinct from y.fingerprint
    order by x.id limit $3"""  # noqa: S608 (built from module constants only)
_TRANSFERS_DETAIL = f"""
    select t.id, array(select x from unnest({_EXPECTED_LINES}) x order by x) as expected,
           array(select {_ACTUAL_LINE} from entries e join accounts a on a.id = e.account_id
                 where e.transfer_id = t.id order by 1) as actual
    from transfers t cross join shard_info s where t.id = any($1::text[])"""  # noqa: S608 (module constants)


async def _check_transfers(shard: _Shard, report: AuditReport, ids: set[str] | None) -> None:
    rows = await shard.conn.fetch(
        _TRANSFERS_DIFFERING, ids is None, sorted(ids or ()), limits.AUDIT_VIOLATIONS_PER_CHECK_MAX
    )
    detail = {r["id"]: r for r in await shard.conn.fetch(_TRANSFERS_DETAIL, [r["id"] for r in rows])}
    orphans = await shard.conn.fetch(
        """select distinct e.transfer_id from entries e left join transfers t on t.id = e.transfer_id
           where t.id is null and ($1 or e.transfer_id = any($2::text[])) limit $3""",
        ids is None, sorted(ids or ()), limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
    )
    for r in orphans:
        report.add("entries_match_transfer", f"{shard.name}: entries name transfer {r['transfer_id']}, which "
                   "does not exist", shard.name)
    for r in rows:
        if r["total"] != 0:
            report.add("transfer_zero_sum", f"{shard.name}: transfer {r['id']} entries sum to {r['total']}", shard.name)
        else:
            d = detail[r["id"]]
            report.add("entries_match_transfer", f"{shard.name}: transfer {r['id']} should have entries "
                       f"{list(d['expected'])} but has {list(d['actual'])}", shard.name)
    report.count("transfers_checked", len(ids) if ids is not None else await shard.conn.fetchval(
        "select count(*) from transfers"))


_RESPONSE_DISAGREES = """
    t.id is null or t.client <> i.client
    or i.body ->> 'state' is distinct from t.state
    or i.body ->> 'amount' is distinct from t.amount::text
    or i.body ->> 'currency' is distinct from t.currency
    or i.body ->> 'reason' is distinct from t.reason
    or (i.status_code = 202) <> (t.state = any($1::text[]))"""


async def _check_idempotency(shard: _Shard, report: AuditReport, ids: set[str] | None) -> None:
    """A stored success response says what its transfer is now: a saga's is rewritten when it settles."""
    # 202 answers a transfer in flight between shards; an open hold was answered 201.
    nonterminal = sorted(shard.nonterminal - {"held"})
    if ids is None:
        rows = await shard.conn.fetch(
            f"""select i.client, i.key, i.status_code, i.body ->> 'state' as said, i.body ->> 'id' as id,
                       t.state from idempotency i left join transfers t on t.id = i.body ->> 'id'
                where i.status_code in (201, 202) and i.body ->> 'id' like 'trf\\_%' and ({_RESPONSE_DISAGREES})
                limit $2""",  # noqa: S608 (built from module constants only)
            nonterminal, limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
        )
        rows += await shard.conn.fetch(
            """select i.client, i.key, i.status_code, i.body ->> 'currency' as said, i.body ->> 'id' as id,
                      a.currency as state from idempotency i left join accounts a on a.id = i.body ->> 'id'
               where i.status_code = 201 and i.body ->> 'id' like 'acc\\_%'
                 and (a.id is null or a.owner_client <> i.client or a.currency <> i.body ->> 'currency')
               limit $1""",
            limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
        )
    else:  # the sagas among the transfers looked at: their stored responses change when they settle
        rows = await shard.conn.fetch(
            f"""select i.client, i.key, i.status_code, i.body ->> 'state' as said, i.body ->> 'id' as id, t.state
                from transfers t join idempotency i on i.client = t.client and i.key = t.idempotency_key
                where t.id = any($2::text[]) and t.idempotency_key is not null and i.status_code in (201, 202)
                  and ({_RESPONSE_DISAGREES})
                limit $3""",  # noqa: S608 (built from module constants only)
            nonterminal, sorted(ids), limits.AUDIT_VIOLATIONS_PER_CHECK_MAX,
        )
    for r in rows:
        report.add("idempotency_matches", f"{shard.name}: the stored response to key {r['key'][:40]!r} of "
                   f"{r['client']} ({r['status_code']}, {r['said']}) disagrees with {r['id']} ({r['state']})",
                   shard.name)


def _show(shown: dict[str, int], check: str) -> bool:
    shown[check] += 1
    return shown[check] <= limits.AUDIT_VIOLATIONS_PER_CHECK_MAX


# Across shards -----------------------------------------------------------------------------------------


async def _read_sagas(shard: _Shard, ids: set[str] | None) -> None:
    every, wanted = ids is None, sorted(ids or ())
    shard.sagas_out = {r["id"]: r for r in await shard.conn.fetch(
        """select t.id, t.credit_shard, t.credit_account, t.state, t.amount, t.currency, t.created_at,
                  (select max(ev.at) from transfer_events ev where ev.transfer_id = t.id) as settled_at
           from transfers t
           where t.debit_shard = (select shard from shard_info) and t.credit_shard is not null
             and ($1 or t.id = any($2::text[]))""",
        every, wanted,
    )}
    shard.inbox = {r["transfer_id"]: r for r in await shard.conn.fetch(
        """select transfer_id, source_shard, outcome, credit_account, amount, currency, received_at from inbox
           where $1 or transfer_id = any($2::text[])""",
        every, wanted,
    )}
    shard.transit = {r["transfer_id"]: int(r["total"]) for r in await shard.conn.fetch(
        """select e.transfer_id, sum(e.amount) as total
           from entries e join accounts a on a.id = e.account_id and a.kind = 'transit'
           where $1 or e.transfer_id = any($2::text[])
           group by e.transfer_id""",
        every, wanted,
    )}


def _check_sagas(shards: list[_Shard], report: AuditReport, watermark: dt.datetime) -> dict[str, set[str]]:
    """Judge every saga whose visible steps are all older than the watermark; returns, per shard, the
    sagas to look at again next run (too recent, not terminal, or in violation)."""
    by_name = {s.name: s for s in shards}
    sources = {tid: (s, r) for s in shards for tid, r in s.sagas_out.items()}
    received = {tid: (s, r) for s in shards for tid, r in s.inbox.items()}
    deferred: dict[str, set[str]] = defaultdict(set)
    judged = pending = too_recent = 0
    for tid in sorted(set(sources) | set(received)):
        source, row = sources.get(tid, (None, None))
        destination, got = received.get(tid, (None, None))
        involved = [s.name for s in (source, destination) if s is not None]
        peer = row["credit_shard"] if row is not None else got["source_shard"] if got is not None else None
        if peer not in by_name:
            continue  # the other side is not among the shards audited
        steps = [row["created_at"], row["settled_at"]] if row is not None else []
        steps += [got["received_at"]] if got is not None else []
        if any(t is not None and t >= watermark for t in steps):
            too_recent += 1
            _defer(deferred, tid, involved)
            continue
        judged += 1
        found = len(report.violations)
        _judge_saga(tid, source, row, destination, got, by_name, report)
        if source is not None and row is not None and row["state"] in source.nonterminal:
            pending += 1
            _defer(deferred, tid, involved)
        if len(report.violations) > found:
            _defer(deferred, tid, involved)  # reported again until repaired
    report.count("sagas_judged", judged)
    report.count("sagas_pending", pending)
    report.count("sagas_after_watermark", too_recent)
    return deferred


def _defer(deferred: dict[str, set[str]], tid: str, shards: Iterable[str]) -> None:
    for name in shards:
        deferred[name].add(tid)


def _judge_saga(
    tid: str, source: _Shard | None, row: Any, destination: _Shard | None, got: Any, by_name: dict[str, _Shard],
    report: AuditReport,
) -> None:
    if row is None:
        report.add("credit_has_debit", f"{destination.name if destination else '?'} applied {tid} which "
                   f"{got['source_shard']} never debited")
        return
    assert source is not None
    applied = got is not None and got["outcome"] == "applied"
    # The credit side must be what the source debited for: the same amount and currency, from that shard, to
    # that account (a compromised source region could send the message of a real debit to another account).
    if got is not None and (got["source_shard"] != source.name or got["amount"] != row["amount"]
                            or got["currency"] != row["currency"] or got["credit_account"] != row["credit_account"]):
        report.add("credit_has_debit", f"{destination.name if destination else '?'} received {tid} as "
                   f"{got['amount']} {got['currency']} for {got['credit_account']} from {got['source_shard']}, "
                   f"but {source.name} debited {row['amount']} {row['currency']} for {row['credit_account']}")
    if row["state"] == "posted" and not applied:
        report.add("posted_has_credit", f"transfer {tid} is posted at {source.name} but {row['credit_shard']} "
                   "has not applied it")
    if row["state"] == "returned" and applied:
        report.add("returned_not_credited", f"transfer {tid} was returned at {source.name} but "
                   f"{row['credit_shard']} applied it too: money created")
    # In flight until the credit side applied it or the source took the money back: by what happened, not by
    # the name of a state, so a state added later (a dead-letter one) still counts as in flight.
    in_flight = not applied and row["state"] != "returned"
    expected = row["amount"] if in_flight else 0
    # Summed over every shard: a message re-addressed after its credit slot moved (issue 11) is applied by the
    # slot's new owner, against that shard's own transit account.
    held = sum(s.transit.get(tid, 0) for s in by_name.values())
    if held != expected:
        report.add("transit_matches_in_flight", f"{source.name}->{row['credit_shard']} {row['currency']}: "
                   f"transfer {tid} ({row['state']}, {'applied' if applied else 'not applied'}) holds {held} in "
                   f"transit accounts, expected {expected}")


# The checkpoint ----------------------------------------------------------------------------------------


async def _save(shard: _Shard, dsn: str, report: AuditReport, deferred: dict[str, set[str]]) -> None:
    """Advance the shard's checkpoint when its own checks were clean, and keep the sagas to look at again.
    Compare-and-set on the horizon this run started from: a concurrent audit's checkpoint is never mixed
    with this one's (the loser keeps the winner's)."""
    checkpoint = shard.checkpoint
    assert checkpoint is not None
    own_clean = not any(v.shard == shard.name and v.check in _LOCAL_CHECKS for v in report.violations)
    conn = await asyncpg.connect(dsn, timeout=limits.DB_CONNECT_TIMEOUT_S, command_timeout=limits.AUDIT_QUERY_TIMEOUT_S)
    try:
        async with conn.transaction():
            await conn.execute("lock table audit_checkpoints in share row exclusive mode")
            stored = await conn.fetchval("select entries_horizon_id from audit_checkpoints")
            advance = own_clean and (stored == checkpoint.previous if shard.mode == INCREMENTAL else True)
            if advance and shard.mode == INCREMENTAL and not checkpoint.accounts and stored == checkpoint.horizon:
                advance = False  # nothing new under the horizon: the stored checkpoint is this one
                await conn.execute("delete from audit_deferred")
            if advance:
                if shard.mode == FULL:
                    await conn.execute("delete from audit_checkpoint_accounts")
                await conn.execute(
                    """insert into audit_checkpoint_accounts
                           (account_id, balance, entries_count, last_entry_id, debits, credits)
                       select * from unnest($1::text[], $2::numeric[], $3::bigint[], $4::bigint[], $5::numeric[],
                                            $6::numeric[])
                       on conflict (account_id) do update set balance = excluded.balance,
                           entries_count = excluded.entries_count, last_entry_id = excluded.last_entry_id,
                           debits = excluded.debits, credits = excluded.credits""",
                    *_columns(checkpoint.accounts),
                )
                await conn.execute(
                    """insert into audit_checkpoints (entries_horizon_id) values ($1)
                       on conflict (singleton) do update set entries_horizon_id = excluded.entries_horizon_id,
                           taken_at = clock_timestamp()""",
                    checkpoint.horizon,
                )
                await conn.execute("delete from audit_deferred")
            await conn.execute(
                "insert into audit_deferred select unnest($1::text[]) on conflict do nothing",
                sorted(deferred.get(shard.name, ())),
            )
    finally:
        await conn.close()


def _columns(rows: list[tuple[str, int, int, int | None, int, int]]) -> list[list[Any]]:
    return [
        [r[0] for r in rows], [Decimal(r[1]) for r in rows], [r[2] for r in rows], [r[3] for r in rows],
        [Decimal(r[4]) for r in rows], [Decimal(r[5]) for r in rows],
    ]


def as_json(report: AuditReport) -> dict[str, Any]:
    return {
        "clean": report.clean,
        "shards": report.shards,
        "modes": report.modes,
        "watermark": report.watermark.isoformat() if report.watermark else None,
        "checkpoint_not_written": report.unsaved,
        "counts": report.counts,
        "totals": report.totals,
        "violations": [{"check": v.check, "detail": v.detail} for v in report.violations],
    }


AUDIT_RUNS_KEPT = 1_000  # per shard: years of daily audits; older rows are deleted as new ones are written


async def record(report: AuditReport, shard_dsns: dict[str, str]) -> list[str]:
    """Write the audit's result into every shard it read (`audit_runs`, migration 0004), where each region's
    `/metrics` reads it as `txroute_last_audit_clean`. Only the names of failed checks are stored. Returns
    the shards that could not be written (the audit's own result stands either way)."""
    failed_checks = sorted({v.check for v in report.violations})
    unwritten = []
    for name, dsn in sorted(shard_dsns.items()):
        try:
            conn = await asyncpg.connect(dsn, timeout=limits.DB_CONNECT_TIMEOUT_S,
                                         command_timeout=limits.DB_COMMAND_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            unwritten.append(name)
            continue
        try:
            await conn.execute(
                "select txr_audit_record($1, $2, $3, $4)",
                report.clean, len(report.violations), failed_checks, AUDIT_RUNS_KEPT,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError):
            unwritten.append(name)
        finally:
            await conn.close()
    return unwritten
