"""One mover per move, and the verify that runs mostly before the freeze (issue 11; app/placement/mover.py).

Real PostgreSQL clusters, region services and a router (an isolated world per test, the `bench` fixture of
test_slot_moves.py); the mover runs in this process, held at a pause point by its test-only FaultPause while the
test acts, and a second mover or cancel runs as an operator runs it: `txroute slots move|cancel` in a process of
its own. Proved here:
- while a mover runs a move, a second `slots move` of the same range and a `slots cancel` of it are refused at
  once with a line naming the move (exit 1, no traceback) and change nothing, and the first mover completes;
- a copy tampered on the target before the pre-verify, with no change-log entry, is found under the freeze (it
  is in D) and the move aborts, the range staying on its source;
- after the pre-verify, the target refuses every write to the range (its fence: it does not own the range yet),
  which is what lets the freeze compare only D and C; and a target row that differs once the catch-up has
  consumed a change of its key (the row counts equal) is found under the freeze (it is in C), the move
  aborting;
- the target books the balances in before the freeze and, under it, only what changed since (migration 0031);
  a move cancelled after that books the target back to zero; the source's cleanup books each account out; all
  three by chunks of accounts, each its own transaction (migrations 0032, 0034; two accounts a chunk here);
- a write to the target's copy after the pre-verify by anyone but the mover is logged there and found under the
  freeze (migration 0036);
- the switch-in books only the differences the mover lists and refuses, whole, a list its check of every
  balance finds wrong (migration 0036); `--full-verify` compares every row under the freeze.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app import limits
from app.config import REPO_ROOT
from app.ledger.postings import Posting, PostingKind, fingerprint, settlement_account_id
from app.ops.audit import audit
from app.placement.mover import FaultPause, Mover, MoveRefused, MoverStopped, MoveSpec
from app.store import shard as shard_module
from app.store.shard import ShardStore
from app.topology.ids import new_account_id, new_transfer_id, parse_account_id
from tests.e2e import test_slot_moves
from tests.e2e.test_slot_moves import INITIAL_BALANCE, RANGE, SOURCE, Bench, open_accounts
from tests.helpers import new_key, poll_until

bench = test_slot_moves.bench  # the fixture: an isolated world (tests/world.py) and a router in front of it


@pytest.fixture(autouse=True)
def narrow_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every move run in this process narrows before its freeze (Mover._narrow compares D and C again and keeps
    what still differs), whatever their size, so the verify's tests here hold with the narrowing too."""
    monkeypatch.setattr(limits, "MOVE_NARROW_ROWS_TARGET", -1)


@pytest.fixture(autouse=True)
def booking_by_chunks_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every move run in this process books by chunks of two accounts (the pre-booking, the cleanup's booking out,
    a cancel's booking back: migrations 0032, 0034), so each of them runs over several chunks here."""
    monkeypatch.setattr(limits, "MOVE_BOOKING_CHUNK_ACCOUNTS", 2)

TARGET = "euw1-b"  # the source's neighbour in eu-west-1
TXROUTE = [sys.executable, "-m", "app.cli.main"]
CLI_TIMEOUT_S = 300.0  # one operator command on a loaded 2-core machine
PAUSE_REACHED_S = 180.0  # the mover reaches its pause point (copy, catch-up, pre-verify)


async def _held_at(bench: Bench, point: str, act: Callable[[Mover, MoveSpec], Awaitable[None]]) -> tuple[str, MoveSpec]:
    """Run the move of RANGE to TARGET here, held at `point` while `act` runs; returns its final phase."""
    pause_file = Path(bench.world.folder) / f"pause-{point}"
    mover = bench.mover(pause=FaultPause(point, pause_file))
    spec = await mover.spec(*RANGE, TARGET)
    await mover.begin(spec)
    run = asyncio.create_task(mover.run(spec))

    async def paused() -> bool:
        assert not run.done(), f"expected the mover to pause at {point}, it ended: {run}"
        return pause_file.exists()

    try:
        await poll_until(paused, timeout_s=PAUSE_REACHED_S, what=f"the mover at its pause point {point}")
        await act(mover, spec)
    finally:
        pause_file.unlink(missing_ok=True)
    return await run, spec


def _dsn_file(bench: Bench) -> Path:
    dsn_file = Path(bench.world.folder) / "shards.dsn"
    dsn_file.write_text("".join(f"{shard}={dsn}\n" for shard, dsn in bench.world.shard_dsns().items()))
    dsn_file.chmod(0o600)
    return dsn_file


async def _txroute(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*TXROUTE, *args], capture_output=True, text=True,
                                   timeout=CLI_TIMEOUT_S, cwd=REPO_ROOT)


async def _source_phase(bench: Bench, move_id: str) -> str:
    conn = await asyncpg.connect(bench.world.shard_dsns()[SOURCE])
    try:
        return str(await conn.fetchval("select phase from slot_moves where id = $1", move_id))
    finally:
        await conn.close()


async def test_a_second_mover_or_a_cancel_of_a_running_move_is_refused_at_once_and_the_first_completes(
    bench: Bench,
) -> None:
    retried: Counter[str] = Counter()
    await open_accounts(bench, retried)
    dsn_file = _dsn_file(bench)
    seen: dict[str, Any] = {}

    async def second_movers(_: Mover, spec: MoveSpec) -> None:
        seen["move"] = await _txroute("slots", "move", f"{RANGE[0]}-{RANGE[1]}", "--to", TARGET, "--yes",
                                      "--dsn-file", str(dsn_file))
        seen["cancel"] = await _txroute("slots", "cancel", spec.id, "--yes", "--dsn-file", str(dsn_file))
        with pytest.raises(MoveRefused) as refused:
            await bench.mover().run(spec)
        seen["in_process"] = str(refused.value)
        seen["phase"] = await _source_phase(bench, spec.id)

    phase, spec = await _held_at(bench, "catching_up", second_movers)
    moves = await bench.mover().moves()
    report = await audit(bench.world.shard_dsns(), full=True)

    expected = f"move {spec.id}: another mover is running it"
    for command in ("move", "cancel"):
        done = seen[command]
        assert isinstance(done, subprocess.CompletedProcess)
        assert done.returncode == 1, f"expected `slots {command}` to exit 1, got {done.returncode}: {done.stderr}"
        assert expected in done.stderr, f"expected {expected!r} from `slots {command}`, got {done.stderr}"
        assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert expected in str(seen["in_process"]), seen["in_process"]
    assert seen["phase"] == "catching_up", f"expected the refusals to change nothing, the source says {seen['phase']}"
    assert phase == "done", bench.log[-5:]
    assert moves[0]["id"] == spec.id and moves[0]["target"]["phase"] == "done", moves[0]
    assert await bench.owner(RANGE[0]) == (TARGET, 2)
    assert report.clean, report.text()


async def test_a_copy_tampered_on_the_target_before_the_pre_verify_is_found_under_the_freeze(bench: Bench) -> None:
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)

    async def tamper(_: Mover, spec: MoveSpec) -> None:  # after the copy; no change-log entry names it
        conn = await asyncpg.connect(bench.world.shard_dsns()[TARGET])
        try:
            changed = await conn.execute("update accounts set overdraft_limit = overdraft_limit + 1 where id = $1",
                                         inside[0])
        finally:
            await conn.close()
        assert changed == "UPDATE 1", f"expected the copy of {inside[0]} on {TARGET}, got {changed}"

    phase, _ = await _held_at(bench, "catching_up", tamper)
    moves = await bench.mover().moves()
    report = await audit(bench.world.shard_dsns(), full=True)

    assert phase == "aborted", f"expected the verify to abort the move, got {phase}: {bench.log[-5:]}"
    assert any("narrowed (round 1)" in line for line in bench.log), "expected the move narrowed before its freeze"
    reason = moves[0]["reason"]
    assert "verify: accounts" in reason and inside[0] in reason, f"expected the tampered account named: {reason}"
    assert any("verify (" in line and "rows compared one by one" in line for line in bench.log), (
        "expected the verify of D and C, not the full verify", bench.log[-5:])
    assert await bench.owner(RANGE[0]) == (SOURCE, 1)
    assert report.clean, report.text()


async def test_after_the_pre_verify_the_target_refuses_writes_to_the_range_and_a_consumed_change_is_verified(
    bench: Bench,
) -> None:
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    account = inside[0]
    slot = parse_account_id(account).slot
    seen: dict[str, Any] = {}

    async def write_to_the_target(_: Mover, spec: MoveSpec) -> None:
        dsns = bench.world.shard_dsns()
        pool = await asyncpg.create_pool(dsns[TARGET], min_size=1, max_size=2, init=shard_module._init_connection)
        assert pool is not None
        store = ShardStore(TARGET, pool, workers=1)
        try:
            # What the target's service would run for a client of the range, were it asked: refused by the fence.
            deposit = await store.post(Posting(
                kind=PostingKind.DEPOSIT, id=new_transfer_id(slot), slot=slot, client=bench.api.client_id,
                key=new_key(), fingerprint=fingerprint("deposit", {"account": account, "amount": 7}),
                debit=settlement_account_id(TARGET, "EUR"), credit=account, amount=7, currency="EUR",
                reference=None))
            opened = await store.open_account({
                "id": new_account_id(slot), "slot": slot, "client": bench.api.client_id,
                "key": new_key(), "fingerprint": "x", "currency": "EUR", "overdraft_limit": 0})
        finally:
            await store.close()
            await pool.close()
        seen["deposit"], seen["open"] = deposit, opened
        target = await asyncpg.connect(dsns[TARGET])
        source = await asyncpg.connect(dsns[SOURCE])
        try:
            seen["copy"] = await target.fetchval("select balance from accounts where id = $1", account)
            # A row of the range that differs on the target once a catch-up consumed a change of its key: a
            # copied stored answer given another key on the target, and a change-log entry for the new key, as
            # the source's trigger writes one.
            renamed = await target.fetchval(
                """update idempotency set key = key || '-renamed'
                   where (client, key) = (select client, key from idempotency where client = $1 and slot = $2
                                          order by key limit 1)
                   returning key""", bench.api.client_id, slot)
            assert renamed is not None, f"expected a copied stored answer of slot {slot} on {TARGET}"
            await source.execute(
                """insert into slot_move_changes (move_id, tbl, key)
                   values ($1, 'idempotency', jsonb_build_object('client', $2::text, 'key', $3::text))""",
                spec.id, bench.api.client_id, renamed)
            seen["tampered"] = renamed
        finally:
            await target.close()
            await source.close()

    phase, _ = await _held_at(bench, "pre_verified", write_to_the_target)
    moves = await bench.mover().moves()
    report = await audit(bench.world.shard_dsns(), full=True)

    for name in ("deposit", "open"):
        outcome = seen[name]
        assert getattr(outcome, "status", None) == 421, f"expected the target to refuse the {name}: {outcome}"
        assert getattr(outcome, "body", {}).get("code") == "misdirected", outcome
    assert seen["copy"] == 0, f"expected the target's copy of {account} untouched at 0, got {seen['copy']}"
    assert phase == "aborted", f"expected the verify to abort the move, got {phase}: {bench.log[-5:]}"
    assert any("narrowed (round 1)" in line for line in bench.log), "expected the move narrowed before its freeze"
    reason = moves[0]["reason"]
    # Since migration 0036 the catch-up deletes on the target a logged row the source does not have (the renamed
    # one), and the target's own log names the key the row had (an update of a key logs both), which the target
    # no longer holds: that row is the one that differs.
    assert "verify: idempotency" in reason and "1 of 1 rows compared differ" in reason, reason
    original = str(seen["tampered"]).removesuffix("-renamed")
    assert f'"key": "{original}"' in reason, f"expected the stored answer's original key named: {reason}"
    assert await bench.owner(RANGE[0]) == (SOURCE, 1)
    assert report.clean, report.text()


async def test_a_write_to_the_targets_copy_after_the_pre_verify_by_anyone_but_the_mover_is_found_under_the_freeze(
    bench: Bench,
) -> None:
    """Migration 0036: the target logs the writes to a range it is copying that its mover did not make (here an
    owner's SQL changing a copied account and deleting a copied stored answer, as migration 0029's saga credit
    once deleted a copy's history), the catch-up consumes them into the rows to compare, and the verify under the freeze
    finds them without counting the range's rows; the move aborts and the source keeps the range."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    slot = parse_account_id(inside[0]).slot
    seen: dict[str, Any] = {}

    async def write_to_the_copy(_: Mover, spec: MoveSpec) -> None:
        target = await asyncpg.connect(bench.world.shard_dsns()[TARGET])
        try:
            seen["account"] = await target.execute(
                "update accounts set overdraft_limit = overdraft_limit + 1 where id = $1", inside[0])
            seen["answer"] = await target.fetchval(
                """delete from idempotency
                   where (client, key) = (select client, key from idempotency where slot = $1 order by key limit 1)
                   returning key""", slot)
            seen["logged"] = await target.fetchval("select count(*) from slot_move_changes where move_id = $1", spec.id)
        finally:
            await target.close()

    phase, _ = await _held_at(bench, "pre_verified", write_to_the_copy)
    moves = await bench.mover().moves()
    report = await audit(bench.world.shard_dsns(), full=True)

    assert seen["account"] == "UPDATE 1" and seen["answer"] is not None, seen
    assert seen["logged"] == 2, f"expected both writes logged on the target: {seen['logged']}"
    assert phase == "aborted", f"expected the verify to abort the move, got {phase}: {bench.log[-5:]}"
    reason = moves[0]["reason"]
    assert "accounts: 1 of" in reason and inside[0] in reason, reason
    assert "idempotency: 1 of" in reason and seen["answer"] in reason, reason
    assert await bench.owner(RANGE[0]) == (SOURCE, 1)
    assert report.clean, report.text()


async def _range_books(bench: Bench, shard: str, move_id: str) -> dict[str, int]:
    """On `shard`: the sum of the range's customer balances, of the move's range accounts, and the count of the
    move's postings by their id's prefix (mvp1 pre-booked in the first round, mvi switched in per currency, mvd a
    difference at the switch, mvc booked back by a cancel, mvb booked out by the source's cleanup)."""
    conn = await asyncpg.connect(bench.world.shard_dsns()[shard])
    try:
        row = await conn.fetchrow(
            """select (select coalesce(sum(balance), 0) from accounts
                       where kind = 'customer' and slot between $1 and $2) as customers,
                      (select coalesce(sum(balance), 0) from accounts
                       where kind = 'range' and id like 'mvr_' || substr($3, 4) || '_%') as range_accounts""",
            *RANGE, move_id)
        postings = {r["prefix"]: int(r["n"]) for r in await conn.fetch(
            """select split_part(id, '_', 1) as prefix, count(*) as n from transfers
               where kind = 'move' and reference = $1 group by 1""", move_id)}
    finally:
        await conn.close()
    return {"customers": int(row["customers"]), "range_accounts": int(row["range_accounts"]),
            **{p: postings.get(p, 0) for p in ("mvp1", "mvi", "mvd", "mvc", "mvb")}}


async def test_the_target_books_the_balances_in_before_the_freeze_and_under_it_only_what_changed(
    bench: Bench,
) -> None:
    """Migration 0031: before the freeze the target books in each account's balance as the source shows it then,
    against its range account; under the freeze it books the range's total from the transit account into the
    range account (one posting per currency) and, for each account changed since, only the difference. The audit
    is clean in between (the target does not own the range yet) and after; the range account ends at zero."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    seen: dict[str, Any] = {}

    async def after_the_prebooking(_: Mover, spec: MoveSpec) -> None:
        seen["prebooked"] = await _range_books(bench, TARGET, spec.id)
        seen["audit"] = await audit(bench.world.shard_dsns(), full=True)
        # A posting on the source after the pre-booking: its two accounts differ from what the target booked.
        seen["transfer"] = await bench.api.transfer(inside[0], inside[1], 10)

    phase, spec = await _held_at(bench, "prebooked", after_the_prebooking)
    switched = await _range_books(bench, TARGET, spec.id)
    cleaned = await _range_books(bench, SOURCE, spec.id)
    report = await audit(bench.world.shard_dsns(), full=True)
    balances = {a: (await bench.api.get(f"/v1/accounts/{a}")).json()["balance"] for a in inside[:2]}

    expected = INITIAL_BALANCE * len(inside)
    assert seen["prebooked"] == {"customers": expected, "range_accounts": -expected, "mvp1": len(inside),
                                 "mvi": 0, "mvd": 0, "mvc": 0, "mvb": 0}, seen["prebooked"]
    assert seen["audit"].clean, seen["audit"].text()
    transfer = seen["transfer"]
    assert transfer.status_code == 201, transfer.text
    assert phase == "done", bench.log[-5:]
    assert switched == {"customers": expected, "range_accounts": 0, "mvp1": len(inside), "mvi": 1, "mvd": 2,
                        "mvc": 0, "mvb": 0}, (
        f"expected one posting in and the two changed accounts' differences: {switched}")
    # The source's cleanup booked each account out to zero, by chunks of two (migration 0034).
    assert cleaned == {"customers": 0, "range_accounts": 0, "mvp1": 0, "mvi": 0, "mvd": 0, "mvc": 0,
                       "mvb": len(inside)}, f"expected every account booked out on the source: {cleaned}"
    assert balances == {inside[0]: INITIAL_BALANCE - 10, inside[1]: INITIAL_BALANCE + 10}, balances
    assert report.clean, report.text()


async def test_the_switch_in_books_only_the_listed_differences_and_its_check_refuses_a_wrong_list(
    bench: Bench,
) -> None:
    """Migration 0036: the switch-out records a check of the range's balances (how many accounts, a hash of each
    one's id and balance, the total per currency) and the mover sends the switch-in only the accounts whose
    balance differs. Held once the source has booked the range out, a switch-in sent a wrong list (one account
    said to hold 1 more than the source booked out) books it, finds that its own check of the range is not the
    source's, and rolls back whole: the target owns nothing and holds only what was pre-booked. The mover then
    switches in (no account changed since the pre-booking: no difference booked), the range account ends at zero
    and the audit is clean."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    seen: dict[str, Any] = {}

    async def at_the_switch(_: Mover, spec: MoveSpec) -> None:
        src = await asyncpg.connect(bench.world.shard_dsns()[SOURCE])
        dst = await asyncpg.connect(bench.world.shard_dsns()[TARGET])
        try:
            check = await src.fetchval("select balance_check::text from slot_moves where id = $1", spec.id)
            wrong = json.dumps({inside[0]: INITIAL_BALANCE + 1})
            with pytest.raises(asyncpg.RaiseError) as refused:
                async with dst.transaction():
                    await dst.fetchval("select txr_move_switch_in_changed($1, $2::jsonb, $3::jsonb)",
                                       spec.id, wrong, check)
            seen["refused"] = str(refused.value)
            seen["check"] = json.loads(check)
            seen["owned"] = await dst.fetchval(
                "select count(*) from slot_ownership where slot_lo <= $2 and slot_hi >= $1 and state = 'owned'",
                *RANGE)
        finally:
            await src.close()
            await dst.close()
        seen["books"] = await _range_books(bench, TARGET, spec.id)

    phase, spec = await _held_at(bench, "switching", at_the_switch)
    switched = await _range_books(bench, TARGET, spec.id)
    report = await audit(bench.world.shard_dsns(), full=True)
    balance = (await bench.api.get(f"/v1/accounts/{inside[0]}")).json()["balance"]

    expected = INITIAL_BALANCE * len(inside)
    assert seen["check"]["accounts"] == len(inside) and sum(seen["check"]["totals"].values()) == expected, seen
    assert "are not those" in seen["refused"] and "nothing switched in" in seen["refused"], seen["refused"]
    assert seen["owned"] == 0, "expected the refused switch-in to leave the target owning nothing of the range"
    assert seen["books"] == {"customers": expected, "range_accounts": -expected, "mvp1": len(inside), "mvi": 0,
                             "mvd": 0, "mvc": 0, "mvb": 0}, f"expected only the pre-booking: {seen['books']}"
    assert phase == "done", bench.log[-5:]
    assert switched == {"customers": expected, "range_accounts": 0, "mvp1": len(inside), "mvi": 1, "mvd": 0,
                        "mvc": 0, "mvb": 0}, f"expected one posting in and no difference: {switched}"
    assert balance == INITIAL_BALANCE
    assert report.clean, report.text()


async def test_a_move_with_full_verify_compares_every_row_under_the_freeze(bench: Bench) -> None:
    """`txroute slots move --full-verify`: under the freeze the mover compares every row of the range (counts and
    checksums of every table: Mover.verify), not only the rows that changed since the pre-verify."""
    retried: Counter[str] = Counter()
    await open_accounts(bench, retried)
    mover = bench.mover(full_verify=True)
    spec = await mover.spec(*RANGE, TARGET)
    await mover.begin(spec)
    phase = await mover.run(spec)

    assert phase == "done", bench.log[-5:]
    assert mover.stats.rows_compared_in_freeze is None, "expected no one-by-one verify under the freeze"
    assert any(spec.id in line and line.endswith("verify: equal") for line in bench.log), bench.log[-8:]
    assert await bench.owner(RANGE[0]) == (TARGET, 2)


async def test_a_move_cancelled_after_the_prebooking_books_the_target_back_to_zero_and_can_run_again(
    bench: Bench,
) -> None:
    """A move stopped after its pre-booking (its freeze recorded) and cancelled: the target's pre-booked accounts
    are booked back to zero against the range account before its copies are dropped; the audit is clean, the
    source serves the range with its balances, and a new move of the range completes."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    spec = await bench.mover().spec(*RANGE, TARGET)
    await bench.mover().begin(spec)
    with pytest.raises(MoverStopped):
        await bench.mover(stop_after="frozen").run(spec)
    prebooked = await _range_books(bench, TARGET, spec.id)
    await bench.mover().cancel(spec)
    cancelled = await _range_books(bench, TARGET, spec.id)
    report = await audit(bench.world.shard_dsns(), full=True)
    again = await bench.move(TARGET)
    balance = (await bench.api.get(f"/v1/accounts/{inside[0]}")).json()["balance"]
    report_again = await audit(bench.world.shard_dsns(), full=True)

    expected = INITIAL_BALANCE * len(inside)
    assert prebooked["customers"] == expected and prebooked["mvp1"] == len(inside), prebooked
    assert cancelled == {"customers": 0, "range_accounts": 0, "mvp1": len(inside), "mvi": 0, "mvd": 0,
                         "mvc": len(inside), "mvb": 0}, (
        f"expected each pre-booked account booked back to zero: {cancelled}")
    assert report.clean, report.text()
    assert again == "done", bench.log[-5:]
    assert balance == INITIAL_BALANCE
    assert report_again.clean, report_again.text()


async def test_a_move_into_a_shard_waits_for_an_earlier_move_half_cancelled_there(bench: Bench) -> None:
    """A cancel whose source side committed but not its target side (the mover died between them) leaves that
    move's pre-booked balances on the target: a new move of the range into it is refused until the cancel is run
    again (migration 0032), which books them back; then the new move completes."""
    retried: Counter[str] = Counter()
    await open_accounts(bench, retried)
    spec = await bench.mover().spec(*RANGE, TARGET)
    await bench.mover().begin(spec)
    with pytest.raises(MoverStopped):
        await bench.mover(stop_after="frozen").run(spec)
    source = await asyncpg.connect(bench.world.shard_dsns()[SOURCE])
    try:  # the cancel's first half only, as a mover killed between its two transactions leaves it
        await source.execute("select txr_move_unfreeze($1, 'cancelled', 'test: half a cancel')", spec.id)
    finally:
        await source.close()
    with pytest.raises(MoveRefused, match="target_move_unfinished") as refused:
        await bench.mover().begin(await bench.mover().spec(*RANGE, TARGET))
    await bench.mover().cancel(spec)
    cancelled = await _range_books(bench, TARGET, spec.id)
    phase = await bench.move(TARGET)
    report = await audit(bench.world.shard_dsns(), full=True)

    assert spec.id in str(refused.value), refused.value
    assert (cancelled["customers"], cancelled["range_accounts"]) == (0, 0), cancelled
    assert phase == "done", bench.log[-5:]
    assert report.clean, report.text()


async def test_a_target_account_not_at_what_was_pre_booked_aborts_the_move_before_its_freeze(bench: Bench) -> None:
    """An account of the range on the target that holds a balance no pre-booking of this move put there would be
    refused by the switch-in after the source booked the range out: the pre-booking reports it and the mover
    aborts before freezing anything."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    spec = await bench.mover().spec(*RANGE, TARGET)
    await bench.mover().begin(spec)
    with pytest.raises(MoverStopped):
        await bench.mover(stop_after="catching_up").run(spec)
    target = await asyncpg.connect(bench.world.shard_dsns()[TARGET])
    try:
        await target.execute("update accounts set balance = 5 where id = $1", inside[0])
        phase = await bench.mover().run(spec)
        await target.execute("update accounts set balance = 0 where id = $1", inside[0])  # undo the damage
    finally:
        await target.close()
    moves = await bench.mover().moves()
    frozen = [line for line in bench.log if spec.id in line and "frozen:" in line]

    assert phase == "aborted", bench.log[-5:]
    assert "do not hold what this move pre-booked" in moves[0]["reason"], moves[0]
    assert not frozen, f"expected nothing frozen: {frozen}"
    assert await bench.owner(RANGE[0]) == (SOURCE, 1)
