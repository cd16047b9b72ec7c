"""`txroute audit` catches each kind of corruption, one test per check (app/ops/audit.py).

Each test makes real money movements through real region processes, proves the audit clean (which also
leaves a checkpoint, so the next run is incremental), seeds one corruption by writing as the database owner
with triggers off (`session_replication_role = replica`, as a bad migration or a manual fix would), polls the
audit until it names the corruption, checks a full run names it too, then repairs it and sees the audit
clean again. One world (clusters and services of its own) serves the module: every test leaves it clean.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from app.local.postgres import Cluster
from app.ops.audit import FULL, INCREMENTAL, AuditReport, audit
from app.topology.ids import new_account_id, new_transfer_id, parse_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, account_in_shard, new_client_id, poll_until, shard_of
from tests.world import World

# One shared clock and light load here, so a short margin is sound (limits.AUDIT_WATERMARK_MARGIN_S is for
# deployed regions); it lets a saga age past the watermark in about a second.
MARGIN_S = 1.0
CAUGHT_WITHIN_S = 30.0
WEST, EAST = "eu-west-1", "us-east-1"


@pytest.fixture(scope="module")
def world(work_dir: Path, topology: Topology, pg_template: Cluster) -> Iterator[World]:
    built = World.build(work_dir / "audit-checks-world", topology, pg_template, {})
    try:
        yield built
    finally:
        built.close()


async def run_audit(world: World, *, full: bool = False) -> AuditReport:
    return await audit(world.shard_dsns(), full=full, margin_s=MARGIN_S)


async def assert_clean(world: World, *, full: bool = False) -> AuditReport:
    report = await run_audit(world, full=full)
    assert report.clean, f"expected a clean audit, got:\n{report.text()}"
    return report


async def owner_sql(world: World, shard: str, statement: str, *args: object) -> str:
    """Run `statement` in `shard` as the database owner, with triggers (append-only, transitions) off."""
    conn = await asyncpg.connect(world.shard_dsns()[shard])
    try:
        await conn.execute("set session_replication_role = replica")
        return str(await conn.execute(statement, *args))
    finally:
        await conn.close()


async def owner_sqls(world: World, shard: str, statements: Iterable[Sequence[object]]) -> None:
    """`owner_sql` of each (statement, *args), in order."""
    for statement, *args in statements:
        assert isinstance(statement, str), statement
        await owner_sql(world, shard, statement, *args)


async def seeded_caught_repaired(
    world: World,
    shard: str,
    check: str,
    needle: str,
    *,
    seed: Iterable[Sequence[object]],
    repair: Iterable[Sequence[object]],
) -> tuple[AuditReport, AuditReport]:
    """The sequence of most tests here: the audit is clean (leaving a checkpoint), `seed` corrupts `shard`,
    the audit names `check` with `needle` (`caught`, a full run too), `repair` undoes it and a full audit is
    clean again. (the clean report before, the report that caught it)"""
    before = await assert_clean(world)
    await owner_sqls(world, shard, seed)
    report = await caught(world, check, needle)
    await owner_sqls(world, shard, repair)
    await assert_clean(world, full=True)
    return before, report


async def caught(world: World, check: str, needle: str) -> AuditReport:
    """Poll the default (incremental) audit until it reports `check` naming `needle`; a full run must too."""
    found: list[AuditReport] = []

    async def names_it() -> bool:
        report = await run_audit(world)
        found.append(report)
        return any(v.check == check and needle in v.detail for v in report.violations)

    await poll_until(names_it, timeout_s=CAUGHT_WITHIN_S, what=f"the audit to report {check} naming {needle}")
    full = await run_audit(world, full=True)
    assert any(v.check == check and needle in v.detail for v in full.violations), (
        f"expected a full audit to report {check} naming {needle} too, got:\n{full.text()}"
    )
    return found[-1]


async def with_apis(world: World, body: Callable[[ApiClient, ApiClient], Awaitable[None]]) -> None:
    client = new_client_id("audit")
    async with world.http(WEST) as west_http, world.http(EAST) as east_http:
        await body(ApiClient(west_http, client), ApiClient(east_http, client))


async def posted_saga(west: ApiClient, east: ApiClient, amount: int = 30) -> tuple[str, str, str]:
    """(transfer id, debit account, credit account) of a transfer posted from eu-west-1 to us-east-1."""
    a, b = await west.new_account(), await east.new_account()
    await west.funded(a, 1_000)
    response = await west.transfer(a, b, amount)
    assert response.status_code == 201 and response.json()["state"] == "posted", response.text
    return response.json()["id"], a, b


async def test_balance_equals_entries_catches_a_balance_written_outside_the_journal(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        account = await west.new_account()
        await west.funded(account, 100)
        shard = shard_of(topology, account)
        before, report = await seeded_caught_repaired(
            world, shard, "balance_equals_entries", account,
            seed=[("update accounts set balance = balance + 7 where id = $1", account)],
            repair=[("update accounts set balance = balance - 7 where id = $1", account)],
        )
        assert report.modes[shard] == INCREMENTAL and before.modes[shard] in (FULL, INCREMENTAL)

    await with_apis(world, body)


async def test_balance_after_chain_catches_an_entry_whose_balance_after_does_not_follow(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        account = await west.new_account()
        await west.funded(account, 100)
        await west.funded(account, 50)
        newest = "(select max(id) from entries where account_id = $1)"
        await seeded_caught_repaired(
            world, shard_of(topology, account), "balance_after_chain", account,
            seed=[(f"update entries set balance_after = balance_after + 1 where id = {newest}", account)],
            repair=[(f"update entries set balance_after = balance_after - 1 where id = {newest}", account)],
        )

    await with_apis(world, body)


async def test_transfer_zero_sum_catches_an_entry_added_to_one_side(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        account = await west.new_account()
        deposit = await west.deposit(account, 100)
        transfer = deposit.json()["id"]
        await seeded_caught_repaired(
            world, shard_of(topology, account), "transfer_zero_sum", transfer,
            seed=[("insert into entries (transfer_id, account_id, amount, balance_after) values ($1, $2, 5, 105)",
                   transfer, account),
                  ("update accounts set balance = balance + 5 where id = $1", account)],
            repair=[("delete from entries where transfer_id = $1 and amount = 5", transfer),
                    ("update accounts set balance = balance - 5 where id = $1", account)],
        )

    await with_apis(world, body)


async def test_entries_match_transfer_catches_a_transfer_whose_amount_was_changed(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        account = await west.new_account()
        transfer = (await west.deposit(account, 100)).json()["id"]
        _, report = await seeded_caught_repaired(
            world, shard_of(topology, account), "entries_match_transfer", transfer,
            seed=[("update transfers set amount = amount + 1 where id = $1", transfer)],
            repair=[("update transfers set amount = amount - 1 where id = $1", transfer)],
        )
        assert not any(v.check == "transfer_zero_sum" for v in report.violations), "its entries still sum to 0"

    await with_apis(world, body)


async def test_idempotency_matches_catches_a_stored_response_that_disagrees_with_the_transfer(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        transfer, debit, _ = await posted_saga(west, east)
        stored = "client = $1 and body ->> 'id' = $2"
        await seeded_caught_repaired(
            world, shard_of(topology, debit), "idempotency_matches", transfer,
            seed=[("update idempotency set body = jsonb_set(body, '{state}', '\"returned\"') "
                   f"where {stored}", west.client_id, transfer)],
            repair=[("update idempotency set body = jsonb_set(body, '{state}', '\"posted\"') "
                     f"where {stored}", west.client_id, transfer)],
        )

    await with_apis(world, body)


async def test_a_malformed_transit_account_name_is_a_violation_not_a_crash(world, topology):
    shard = topology.region(WEST).shards[0].name
    names = ["trn_nonsense", f"trn_{shard}_{shard}_EUR", f"trn_{shard}_use1-a_EURO", "trn_a_b_c_d_e"]
    await assert_clean(world)
    for name in names:
        await owner_sql(world, shard, "insert into accounts (id, slot, kind, owner_client, currency) "
                        "values ($1, $2, 'transit', 'txroute', 'EUR')", name, topology.shard(shard).slots[0].lo)
    for name in names:
        await caught(world, "transit_account_name", repr(name[:80]))
    await owner_sql(world, shard, "delete from accounts where id = any($1::text[])", names)
    await assert_clean(world, full=True)


async def test_posted_has_credit_catches_a_posted_saga_the_credit_side_never_applied(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        transfer, _, credit = await posted_saga(west, east)
        await assert_clean(world)
        destination = shard_of(topology, credit)
        saved = await _inbox_row(world, destination, transfer)
        await owner_sql(world, destination, "delete from inbox where transfer_id = $1", transfer)
        await caught(world, "posted_has_credit", transfer)
        await _restore_inbox_row(world, destination, saved)
        await assert_clean(world)

    await with_apis(world, body)


async def test_returned_not_credited_catches_a_returned_saga_the_credit_side_applied(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        a = await west.new_account()
        await west.funded(a, 100)
        usd = await east.new_account("USD")
        response = await west.transfer(a, usd, 40)  # refused by the credit side: currency_mismatch
        assert response.json()["state"] == "returned", response.text
        transfer = response.json()["id"]
        await seeded_caught_repaired(
            world, shard_of(topology, usd), "returned_not_credited", transfer,
            seed=[("update inbox set outcome = 'applied' where transfer_id = $1", transfer)],
            repair=[("update inbox set outcome = 'refused' where transfer_id = $1", transfer)],
        )

    await with_apis(world, body)


async def test_credit_has_debit_catches_a_credit_whose_source_never_debited(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        credit = await east.new_account()
        source = topology.region(WEST).shards[0].name
        forged = new_transfer_id(topology.shard(source).slots[0].lo)
        destination = shard_of(topology, credit)
        transit = f"trn_{destination}_{source}_EUR"
        # A whole credit-side application, consistent in its own shard, of a message nobody sent.
        forge = [
            ("insert into accounts (id, slot, kind, owner_client, currency) values ($1, $2, 'transit', 'txroute', "
             "'EUR') on conflict (id) do nothing", transit, parse_account_id(credit).slot),
            ("insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, state, "
             "debit_shard, credit_shard) values ($1, $2, 'transfer', $3, $4, 10, 'EUR', 'posted', $5, $6)",
             forged, east.client_id, new_account_id(topology.shard(source).slots[0].lo), credit, source, destination),
            ("insert into entries (transfer_id, account_id, amount, balance_after) select $1, $2, -10, balance - 10 "
             "from accounts where id = $2", forged, transit),
            ("insert into entries (transfer_id, account_id, amount, balance_after) select $1, $2, 10, balance + 10 "
             "from accounts where id = $2", forged, credit),
            ("update accounts set balance = balance + (case when id = $1 then -10 else 10 end) "
             "where id in ($1, $2)", transit, credit),
            ("insert into inbox (transfer_id, source_shard, outcome, credit_account, amount, currency) "
             "values ($1, $2, 'applied', $3, 10, 'EUR')", forged, source, credit),
        ]
        repair = [
            ("delete from inbox where transfer_id = $1", forged),
            ("delete from entries where transfer_id = $1", forged),
            ("delete from transfers where id = $1", forged),
            ("update accounts set balance = balance - (case when id = $1 then -10 else 10 end) "
             "where id in ($1, $2)", transit, credit),
        ]
        await seeded_caught_repaired(world, destination, "credit_has_debit", forged, seed=forge, repair=repair)

    await with_apis(world, body)


async def test_transit_matches_in_flight_catches_transit_money_no_message_carries(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        transfer, debit, credit = await posted_saga(west, east)
        source, destination = shard_of(topology, debit), shard_of(topology, credit)
        # The credit side's transit entry vanishes with its account's balance: that shard still balances
        # (it sums to zero once its transit account follows), but the pair's transit no longer nets to 0.
        entry = await _fetch(world, destination, "select e.id, e.account_id, e.amount from entries e join accounts a "
                             "on a.id = e.account_id and a.kind = 'transit' where e.transfer_id = $1", transfer)
        assert entry is not None, f"expected a transit entry of {transfer} in {destination}"

        def shift(sign: str) -> list[tuple[object, ...]]:
            """Move 1 minor unit from the transit entry to the credit entry (sign '-') or back ('+')."""
            back = "+" if sign == "-" else "-"
            return [
                (f"update entries set amount = amount {sign} 1, balance_after = balance_after {sign} 1 "
                 "where id = $1", entry["id"]),
                (f"update entries set amount = amount {back} 1, balance_after = balance_after {back} 1 "
                 "where transfer_id = $1 and id <> $2", transfer, entry["id"]),
                (f"update accounts set balance = balance {sign} 1 where id = $1", entry["account_id"]),
                (f"update accounts set balance = balance {back} 1 where id = $1", credit),
            ]

        await seeded_caught_repaired(world, destination, "transit_matches_in_flight", transfer,
                                     seed=shift("-"), repair=shift("+"))
        assert source != destination, "expected a saga between two shards"

    await with_apis(world, body)


async def test_money_conserved_catches_a_deposit_without_money_and_only_a_full_run_sees_old_history(
    world, topology
):
    """Under the checkpoint, entries are trusted as append-only: an incremental run re-reads only each
    account's last checkpointed entry. A full run recomputes everything and finds what was changed there."""
    shard = topology.region("eu-north-1").shards[1].name

    async def body(west: ApiClient, east: ApiClient) -> None:
        async with world.http("eu-north-1") as http:
            north = ApiClient(http, west.client_id)
            account = await account_in_shard(north, topology, shard)
            await north.funded(account, 100)
            await north.funded(account, 50)
            first = await _fetch(world, shard, "select min(id) as id from entries where account_id = $1", account)

            async def checkpointed() -> bool:
                report = await run_audit(world)
                assert report.clean, report.text()
                horizon = await _fetch(world, shard, "select entries_horizon_id as id from audit_checkpoints")
                return horizon is not None and horizon["id"] > first["id"] + 1

            await poll_until(checkpointed, timeout_s=CAUGHT_WITHIN_S, what="the checkpoint to cover the entries")
            await owner_sql(world, shard, "update entries set amount = amount + 3, balance_after = balance_after + 3 "
                            "where id = $1", first["id"])
            incremental = await run_audit(world)
            assert not any(account in v.detail for v in incremental.violations), (
                f"expected an incremental run to trust the checkpointed history, got:\n{incremental.text()}"
            )
            full = await run_audit(world, full=True)
            assert any(v.check == "balance_equals_entries" and account in v.detail for v in full.violations), (
                full.text()
            )
            await owner_sql(world, shard, "update entries set amount = amount - 3, balance_after = balance_after - 3 "
                            "where id = $1", first["id"])
            await assert_clean(world, full=True)
            # A deposit recorded without its money: deposits minus withdrawals no longer match the balances.
            settlement = f"set_{shard}_EUR"
            forged = new_transfer_id(parse_account_id(account).slot)
            await owner_sql(world, shard, "insert into transfers (id, client, kind, debit_account, credit_account, "
                            "amount, currency, state) values ($1, $2, 'deposit', $3, $4, 40, 'EUR', 'posted')",
                            forged, north.client_id, settlement, account)
            full = await run_audit(world, full=True)
            checks = {v.check for v in full.violations if shard in v.detail}
            assert {"money_conserved", "entries_match_transfer"} <= checks, full.text()
            await owner_sql(world, shard, "delete from transfers where id = $1", forged)
            await assert_clean(world, full=True)

    await with_apis(world, body)


async def _fetch(world: World, shard: str, query: str, *args: object) -> asyncpg.Record | None:
    conn = await asyncpg.connect(world.shard_dsns()[shard])
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


async def _inbox_row(world: World, shard: str, transfer: str) -> asyncpg.Record:
    row = await _fetch(world, shard, "select * from inbox where transfer_id = $1", transfer)
    assert row is not None, f"expected {transfer} in {shard}'s inbox"
    return row


async def _restore_inbox_row(world: World, shard: str, row: asyncpg.Record) -> None:
    columns = list(row.keys())
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    await owner_sql(world, shard, f"insert into inbox ({', '.join(columns)}) values ({placeholders})",
                    *row.values())


async def test_an_audit_that_cannot_write_its_checkpoint_still_reports_and_says_so(world, topology):
    """A read-only role (as an auditor might be given): the audit reads, judges and reports; it names the
    shards whose checkpoint it could not write instead of failing."""
    role, password = "audit_reader", "reader-" + new_client_id("pw")[-8:]
    dsns = {}
    for name, dsn in world.shard_dsns().items():
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("select 1 from pg_roles where rolname = $1", role):
                await conn.execute(f"create role {role} login password '{password}'")
            else:
                await conn.execute(f"alter role {role} password '{password}'")
            # Shard databases admit only the roles granted CONNECT (provisioning revokes it from PUBLIC).
            await conn.execute(f'grant connect on database "{dsn.rsplit("/", 1)[1]}" to {role}')
            await conn.execute(f"grant select on all tables in schema public to {role}")
        finally:
            await conn.close()
        owner = dsn.split("//", 1)[1].split("@", 1)[0]
        dsns[name] = dsn.replace(owner, f"{role}:{password}", 1)
    report = await audit(dsns, margin_s=MARGIN_S)
    assert report.clean, report.text()
    assert sorted(report.unsaved) == sorted(dsns), f"expected every shard named as not checkpointed: {report.unsaved}"
    assert "checkpoint not written" in report.text()


async def test_credit_has_debit_catches_a_credit_applied_to_another_account_than_the_source_debited_for(
    world, topology
):
    """What a compromised source region can still do (docs/architecture.md, trust domains): send the message
    of a real debit with another credit account. The credit side is consistent in itself; only comparing it
    with the source's transfer shows it."""
    async def body(west: ApiClient, east: ApiClient) -> None:
        tid, _, credit = await posted_saga(west, east, amount=30)
        destination = shard_of(topology, credit)
        # Fresh, so the moved entry chains from 0 as it did on `credit`.
        other = await account_in_shard(east, topology, destination)
        redirect = [
            ("update entries set account_id = $2 where transfer_id = $1 and account_id = $3", tid, other, credit),
            ("update accounts set balance = balance + (case when id = $1 then -30 else 30 end) "
             "where id in ($1, $2)", credit, other),
            ("update transfers set credit_account = $2 where id = $1", tid, other),
            ("update inbox set credit_account = $2 where transfer_id = $1", tid, other),
        ]
        await owner_sqls(world, destination, redirect)
        await caught(world, "credit_has_debit", tid)
        await owner_sqls(world, destination, [
            ("update entries set account_id = $3 where transfer_id = $1 and account_id = $2", tid, other, credit),
            ("update accounts set balance = balance - (case when id = $1 then -30 else 30 end) "
             "where id in ($1, $2)", credit, other),
            ("update transfers set credit_account = $2 where id = $1", tid, credit),
            ("update inbox set credit_account = $2 where transfer_id = $1", tid, credit),
        ])
        await assert_clean(world, full=True)

    await with_apis(world, body)


async def test_the_audit_is_clean_after_holds_of_every_fate_and_catches_held_that_drifted(world, topology):
    async def body(west: ApiClient, east: ApiClient) -> None:
        a, b = await west.new_account(), await west.new_account()
        far = await east.new_account()
        await west.funded(a, 1_000)
        open_hold = (await west.hold(a, b, 100)).json()["id"]
        voided = (await west.hold(a, b, 50)).json()["id"]
        assert (await west.void(voided)).status_code == 200
        partial = (await west.hold(a, b, 80)).json()["id"]
        assert (await west.capture(partial, 30)).status_code == 201
        saga = (await west.hold(a, far, 70)).json()["id"]  # its capture is a saga to us-east-1
        captured = await west.capture(saga, 60)
        assert captured.status_code in (201, 202), captured.text
        expired = (await west.hold(a, b, 20, expires_in_s=1)).json()["id"]

        async def settled() -> bool:
            reads = [(await west.get(f"/v1/transfers/{t}")).json()["state"] for t in (saga, expired)]
            return reads == ["posted", "expired"]

        await poll_until(settled, timeout_s=CAUGHT_WITHIN_S, what="the captured saga to post and a hold to expire")
        await assert_clean(world, full=True)
        shard = shard_of(topology, a)
        await seeded_caught_repaired(
            world, shard, "held_equals_open_holds", a,
            seed=[("update accounts set held = held + 3 where id = $1", a)],
            repair=[("update accounts set held = held - 3 where id = $1", a)],
        )
        await seeded_caught_repaired(
            world, shard, "available_not_negative", a,
            seed=[("update transfers set amount = amount + 5000, hold_amount = hold_amount + 5000 where id = $1",
                   open_hold),
                  ("update accounts set held = held + 5000 where id = $1", a)],
            repair=[("update transfers set amount = amount - 5000, hold_amount = hold_amount - 5000 where id = $1",
                     open_hold),
                    ("update accounts set held = held - 5000 where id = $1", a)],
        )

    await with_apis(world, body)
