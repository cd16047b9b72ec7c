"""`txroute audit`: a global reconciliation over every shard (DESIGN D4, D6).

Per shard: every account's balance equals the sum of its entries; every transfer's entries sum to zero;
the shard sums to zero per currency; no customer balance is below its limit. Across shards: for every pair,
what each holds in transit towards the other adds up to the messages still in flight; no transfer is posted
without its credit, or returned although credited; and per currency, customer plus transit balances are
exactly what deposits minus withdrawals put there.

Each shard is read in one REPEATABLE READ transaction; shards are read one after another, so under traffic
a saga can move between two reads. The cross-shard checks are therefore re-run (bounded) before a
difference is reported; per-shard checks are exact at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app import limits

AUDIT_ATTEMPTS_MAX = 3
AUDIT_RETRY_DELAY_S = 1.0


@dataclass
class Violation:
    check: str
    detail: str


@dataclass
class AuditReport:
    shards: list[str]
    violations: list[Violation] = field(default_factory=list)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)  # currency -> figure -> amount
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.violations

    def text(self) -> str:
        lines = [f"txroute audit: {len(self.shards)} shards ({', '.join(self.shards)})"]
        lines += [f"  {name}: {value}" for name, value in sorted(self.counts.items())]
        for currency, figures in sorted(self.totals.items()):
            lines.append(f"  {currency}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        if self.clean:
            lines.append("OK: no violation")
        else:
            lines.append(f"FAILED: {len(self.violations)} violation(s)")
            lines += [f"  [{v.check}] {v.detail}" for v in self.violations]
        return "\n".join(lines)


@dataclass
class _Shard:
    name: str
    accounts: list[asyncpg.Record]
    unbalanced_transfers: list[asyncpg.Record]
    sagas_out: list[asyncpg.Record]  # transfers this shard debited towards another shard
    inbox: dict[str, asyncpg.Record]  # transfer id -> what this shard did with an incoming message
    funds: list[asyncpg.Record]  # deposits and withdrawals per currency


async def audit(shard_dsns: dict[str, str]) -> AuditReport:
    """Read every shard and check the invariants; `shard_dsns` maps shard name to its database DSN."""
    report = AuditReport(shards=sorted(shard_dsns))
    for attempt in range(1, AUDIT_ATTEMPTS_MAX + 1):
        shards = [await _read(name, dsn) for name, dsn in sorted(shard_dsns.items())]
        report = AuditReport(shards=sorted(shard_dsns))
        for shard in shards:
            _check_shard(shard, report)
        local_violations = len(report.violations)
        _check_sagas(shards, report)
        _check_money(shards, report)
        cross_shard_failed = len(report.violations) > local_violations
        if not cross_shard_failed or attempt == AUDIT_ATTEMPTS_MAX:
            return report
        await asyncio.sleep(AUDIT_RETRY_DELAY_S)  # a saga may have moved between two shard reads
    return report


async def _read(name: str, dsn: str) -> _Shard:
    conn = await asyncpg.connect(dsn, timeout=limits.DB_CONNECT_TIMEOUT_S, command_timeout=60)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            accounts = await conn.fetch(
                """select a.id, a.kind, a.currency, a.balance, a.overdraft_limit,
                          coalesce(e.total, 0)::bigint as entries_total
                   from accounts a
                   left join (select account_id, sum(amount) as total from entries group by account_id) e
                          on e.account_id = a.id"""
            )
            unbalanced = await conn.fetch(
                "select transfer_id, sum(amount)::bigint as total from entries group by transfer_id "
                "having sum(amount) <> 0"
            )
            sagas_out = await conn.fetch(
                """select id, credit_shard, state, amount, currency from transfers
                   where debit_shard = (select shard from shard_info) and credit_shard is not null"""
            )
            inbox = await conn.fetch("select transfer_id, source_shard, outcome, amount, currency from inbox")
            funds = await conn.fetch(
                """select currency, kind, sum(amount)::bigint as total from transfers
                   where kind in ('deposit', 'withdrawal') group by currency, kind"""
            )
    finally:
        await conn.close()
    return _Shard(name, list(accounts), list(unbalanced), list(sagas_out),
                  {r["transfer_id"]: r for r in inbox}, list(funds))


def _check_shard(shard: _Shard, report: AuditReport) -> None:
    by_currency: dict[str, int] = defaultdict(int)
    for a in shard.accounts:
        by_currency[a["currency"]] += a["balance"]
        if a["balance"] != a["entries_total"]:
            report.violations.append(Violation(
                "balance_equals_entries",
                f"{shard.name}: account {a['id']} balance {a['balance']} but its entries sum to {a['entries_total']}",
            ))
        if a["kind"] == "customer" and a["balance"] < -a["overdraft_limit"]:
            report.violations.append(Violation(
                "balance_within_limit", f"{shard.name}: account {a['id']} balance {a['balance']} below its limit"
            ))
    for t in shard.unbalanced_transfers:
        report.violations.append(Violation(
            "transfer_zero_sum", f"{shard.name}: transfer {t['transfer_id']} entries sum to {t['total']}"
        ))
    for currency, total in sorted(by_currency.items()):
        if total != 0:
            report.violations.append(Violation(
                "shard_zero_sum", f"{shard.name}: {currency} accounts sum to {total}, not 0"
            ))
    report.counts["accounts"] = report.counts.get("accounts", 0) + len(shard.accounts)


def _check_sagas(shards: list[_Shard], report: AuditReport) -> None:
    by_name = {s.name: s for s in shards}
    # in flight: debited at the source, not (yet) applied at the destination, not returned
    in_flight: dict[tuple[str, str, str], int] = defaultdict(int)
    pending = 0
    for source in shards:
        for t in source.sagas_out:
            destination = by_name.get(t["credit_shard"])
            received = destination.inbox.get(t["id"]) if destination else None
            applied = received is not None and received["outcome"] == "applied"
            if t["state"] == "pending":
                pending += 1
                if not applied:
                    in_flight[(source.name, t["credit_shard"], t["currency"])] += t["amount"]
            elif t["state"] == "posted" and not applied:
                report.violations.append(Violation(
                    "posted_has_credit", f"transfer {t['id']} is posted at {source.name} but "
                    f"{t['credit_shard']} has not applied it",
                ))
            elif t["state"] == "returned" and applied:
                report.violations.append(Violation(
                    "returned_not_credited", f"transfer {t['id']} was returned at {source.name} but "
                    f"{t['credit_shard']} applied it too: money created",
                ))
    for destination in shards:
        for transfer_id, received in destination.inbox.items():
            origin = by_name.get(received["source_shard"])
            if origin is not None and not any(t["id"] == transfer_id for t in origin.sagas_out):
                report.violations.append(Violation(
                    "credit_has_debit", f"{destination.name} applied {transfer_id} which {origin.name} never debited"
                ))
    transit: dict[tuple[str, str, str], int] = defaultdict(int)
    for shard in shards:
        for a in shard.accounts:
            if a["kind"] == "transit":
                _, own, peer, currency = a["id"].split("_")
                assert own == shard.name, a["id"]
                transit[(own, peer, currency)] += a["balance"]
    pairs = {(min(s, d), max(s, d), c) for (s, d, c) in set(transit) | set(in_flight)}
    for a, b, currency in sorted(pairs):
        held = transit[(a, b, currency)] + transit[(b, a, currency)]
        flying = in_flight[(a, b, currency)] + in_flight[(b, a, currency)]
        if held != flying:
            report.violations.append(Violation(
                "transit_matches_in_flight",
                f"{a}<->{b} {currency}: transit accounts hold {held} but messages in flight carry {flying}",
            ))
    report.counts["sagas_pending"] = pending


def _check_money(shards: list[_Shard], report: AuditReport) -> None:
    figures: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for shard in shards:
        for a in shard.accounts:
            figures[a["currency"]][a["kind"]] += a["balance"]
        for f in shard.funds:
            figures[f["currency"]][f["kind"] + "s"] += f["total"]
    for currency, f in sorted(figures.items()):
        expected = f["deposits"] - f["withdrawals"]
        held = f["customer"] + f["transit"]
        report.totals[currency] = {
            "deposits": f["deposits"], "withdrawals": f["withdrawals"],
            "customer": f["customer"], "in_transit": f["transit"], "settlement": f["settlement"],
        }
        if held != expected:
            report.violations.append(Violation(
                "money_conserved", f"{currency}: customers and transit hold {held} but deposits minus "
                f"withdrawals is {expected}",
            ))


def as_json(report: AuditReport) -> dict[str, Any]:
    return {
        "clean": report.clean,
        "shards": report.shards,
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
            async with conn.transaction():
                await conn.execute(
                    "insert into audit_runs (clean, violations, failed_checks) values ($1, $2, $3)",
                    report.clean, len(report.violations), failed_checks,
                )
                await conn.execute(
                    "delete from audit_runs where id <= (select max(id) from audit_runs) - $1", AUDIT_RUNS_KEPT
                )
        except (OSError, TimeoutError, asyncpg.PostgresError):
            unwritten.append(name)
        finally:
            await conn.close()
    return unwritten
