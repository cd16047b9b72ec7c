"""Slot moves end to end (issue 11): real PostgreSQL clusters, region services and a router as processes (an
isolated world per test), the mover (app/placement/mover.py) driving the moves.

Proved here: a move inside a region and then across regions while clients keep writing through the router
(every acknowledged transfer exactly once, balances equal the model, `txroute audit --full` clean, only retried
503 slot_moving / 421 on the way); a request answered before the move replays from the new owner; a saga whose
destination moves while its message waits is re-addressed and completes; cancel before the switch; refusals;
the mover stopped after each phase (and a database stopped mid-move), then run again, completes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from app.ops.audit import audit
from app.ops.target import Target
from app.placement.mover import Mover, MoveRefused, MoverStopped
from app.topology.ids import parse_account_id
from tests.e2e.conftest import RouterApi, router_process
from tests.helpers import new_client_id, new_key, poll_until
from tests.keys import SessionKeys

SOURCE = "euw1-a"
RANGE = (1366, 2048)  # euw1-a's slots in regions/
INITIAL_BALANCE = 10_000
WRITERS = 6
ACKS_MIN = 60
RETRY_FOR_S = 60.0
SETTLE_WAIT_S = 60.0  # every acknowledged saga settles after the writers stop (relay backoff is capped at 10 s)
RETRY_INTERVAL_S = 0.05  # a client's pause between retries of an answered 503 / 421 (not a wait for a condition)


@dataclass
class Bench:
    world: Any
    router: Any
    api: RouterApi
    log: list[str] = field(default_factory=list)

    def mover(self, **options: Any) -> Mover:
        world = self.world
        target = Target(
            topology=world.topology, shard_dsns=world.shard_dsns(), router_urls=[self.router.url],
            region_urls={name: s.url for name, s in world.services.items()},
        )
        return Mover(target, progress=lambda line: self.log.append(f"{time.monotonic():.3f} {line}"), **options)

    async def move(self, to_shard: str, *, slots: tuple[int, int] = RANGE, **options: Any) -> str:
        mover = self.mover(**options)
        spec = await mover.spec(*slots, to_shard)
        await mover.begin(spec)
        return await mover.run(spec)

    async def owner(self, slot: int) -> tuple[str, int]:
        """The shard whose database owns `slot`, and its epoch (exactly one must)."""
        found = []
        for shard, dsn in self.world.shard_dsns().items():
            conn = await asyncpg.connect(dsn)
            try:
                row = await conn.fetchrow("select epoch from slot_ownership where $1 between slot_lo and slot_hi "
                                          "and state = 'owned'", slot)
            finally:
                await conn.close()
            if row is not None:
                found.append((shard, int(row["epoch"])))
        assert len(found) == 1, f"expected exactly one owner of slot {slot}, got {found}"
        return found[0]


# Sagas wait in their outbox until a test restarts the region without these (app/config.py FaultSettings).
PAUSED = {"TXROUTE_FAULT_SKIP_FAST_PATH": "1", "TXROUTE_FAULT_RELAY_PAUSED": "1"}


@pytest.fixture
async def bench(request: pytest.FixtureRequest, make_world: Callable[..., Any], keys: SessionKeys
                ) -> AsyncIterator[Bench]:
    world = make_world(getattr(request, "param", None))
    router = router_process("router-moves", "eu-west-1", {r: s.url for r, s in world.services.items()}, keys,
                            world.folder / "logs")
    router.start()
    try:
        router.wait_ready()
        async with httpx.AsyncClient(base_url=router.url, timeout=30.0) as http:
            client = new_client_id("moves")
            yield Bench(world, router, RouterApi(http, client, keys.client_token(client)))
    finally:
        router.stop()


async def answered(call: Callable[[], Awaitable[httpx.Response]], retried: Counter[str]) -> httpx.Response:
    """What a client does: retries a request with its key while it is answered 503, 421 or 409 (counted by
    code; the test then says which codes it allows)."""
    give_up = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            response: httpx.Response | None = await call()
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code not in (409, 421, 503):
            return response
        if response is not None and response.status_code == 409 and response.json().get("code") != "account_busy":
            return response
        retried[response.json().get("code", "?") if response is not None else "transport"] += 1
        assert time.monotonic() < give_up, f"expected an answer within {RETRY_FOR_S}s, last: {response}"
        await asyncio.sleep(RETRY_INTERVAL_S)


async def open_accounts(bench: Bench, retried: Counter[str]) -> tuple[list[str], list[str]]:
    """Accounts in the moved range (at least 3) and others in every region; all funded."""
    inside: list[str] = []
    outside: list[str] = []
    while len(inside) < 3 or len([a for a in outside if _slot(a) < RANGE[0]]) < 2:
        region = "eu-west-1" if len(inside) < 3 else "eu-north-1"
        response = await bench.api.open_account(region=region)
        assert response.status_code == 201, response.text
        account = response.json()["id"]
        (inside if RANGE[0] <= _slot(account) <= RANGE[1] else outside).append(account)
    for region in ("us-east-1", "eu-west-1"):
        response = await bench.api.open_account(region=region)
        assert response.status_code == 201, response.text
        account = response.json()["id"]
        (inside if RANGE[0] <= _slot(account) <= RANGE[1] else outside).append(account)
    for account in inside + outside:
        response = await answered(lambda a=account: bench.api.deposit(a, INITIAL_BALANCE), retried)
        assert response.status_code == 201, response.text
    return inside, outside


def _slot(account: str) -> int:
    return parse_account_id(account).slot


async def undelivered(bench: Bench) -> dict[str, list[dict[str, Any]]]:
    """Every shard's saga messages not delivered yet, as the outbox records them (a failing test says why)."""
    found = {}
    for shard, dsn in bench.world.shard_dsns().items():
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            found[shard] = [{"unreachable": type(exc).__name__}]
            continue
        try:
            rows = await conn.fetch(
                """select transfer_id, destination_region, message->>'destination_shard' as destination_shard,
                          attempts, failures, last_error, dead_lettered_at is not null as dead,
                          next_attempt_at - clock_timestamp() as due_in
                   from outbox where delivered_at is null order by created_at limit 20""")
        finally:
            await conn.close()
        if rows:
            found[shard] = [{k: str(v) for k, v in dict(r).items()} for r in rows]
    return found


async def settled_balances(bench: Bench, acknowledged: dict[str, tuple[str, str, int]], accounts: list[str],
                           retried: Counter[str]) -> dict[str, int]:
    last_pending: list[str] = []

    async def quiet() -> bool:
        for transfer_id in acknowledged:
            shown = await answered(lambda t=transfer_id: bench.api.get(f"/v1/transfers/{t}"), retried)
            assert shown.status_code == 200, f"expected {transfer_id} readable, got {shown.text}"
            if shown.json()["state"] == "pending":
                last_pending[:] = [shown.text]
                return False
            assert shown.json()["state"] == "posted", f"expected {transfer_id} posted, got {shown.text}"
        return True

    try:
        await poll_until(quiet, timeout_s=SETTLE_WAIT_S, what="every acknowledged transfer terminal")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still pending: {last_pending}; undelivered saga messages: "
                             f"{await undelivered(bench)}") from None
    balances = {}
    for account in accounts:
        response = await answered(lambda a=account: bench.api.account(a), retried)
        assert response.status_code == 200, response.text
        balances[account] = int(response.json()["balance"])
    return balances


async def test_a_range_moves_within_a_region_then_across_regions_under_writes_through_the_router(
    bench: Bench,
) -> None:
    retried: Counter[str] = Counter()
    inside, outside = await open_accounts(bench, retried)
    accounts = inside + outside
    # Answered before the moves, replayed after them (DESIGN D5, issue 11 item 3).
    before_key = new_key()
    before = await bench.api.deposit(inside[0], 77, key=before_key)
    assert before.status_code == 201, before.text

    acknowledged: dict[str, tuple[str, str, int]] = {}
    moves_done = asyncio.Event()
    phases: list[str] = []

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not moves_done.is_set() or len(acknowledged) < ACKS_MIN:
            debit, credit = rng.sample(accounts, 2)
            amount = rng.randint(1, 50)
            key = new_key()
            response = await answered(
                lambda d=debit, c=credit, n=amount, k=key: bench.api.transfer(d, c, n, key=k), retried)
            assert response.status_code in (201, 202), f"unexpected answer: {response.status_code} {response.text}"
            acknowledged[response.json()["id"]] = (debit, credit, amount)

    async def mover() -> None:
        try:
            phases.append(await bench.move("euw1-b"))  # inside eu-west-1
            phases.append(await bench.move("use1-a"))  # to us-east-1
        finally:
            moves_done.set()

    await asyncio.gather(mover(), *(writer(i) for i in range(WRITERS)))
    log = [x for x in bench.log if 'copy' not in x]
    assert phases == ["done", "done"], f"expected both moves done, got {phases}; log: {log}"

    balances = await settled_balances(bench, acknowledged, accounts, retried)
    replay = await answered(lambda: bench.api.deposit(inside[0], 77, key=before_key), retried)
    expected = dict.fromkeys(accounts, INITIAL_BALANCE)
    expected[inside[0]] += 77
    for debit, credit, amount in acknowledged.values():
        expected[debit] -= amount
        expected[credit] += amount
    owner = await bench.owner(RANGE[0])
    moves = await bench.mover().moves()
    report = await audit(bench.world.shard_dsns(), full=True)

    assert balances == expected, (
        "expected every acknowledged transfer applied exactly once: "
        f"{ {a: (balances[a], expected[a]) for a in accounts if balances[a] != expected[a]} }")
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true", (
        f"expected the stored answer replayed by the new owner, got {replay.status_code} {replay.headers}")
    assert replay.json() == before.json(), "expected the same stored body"
    assert owner == ("use1-a", 3), f"expected use1-a to own the range at epoch 3, got {owner}"
    assert set(retried) <= {"slot_moving", "misdirected"}, f"expected only moves' refusals retried, got {retried}"
    assert len(acknowledged) >= ACKS_MIN, len(acknowledged)
    assert [m["phase"] for m in moves] == ["done", "done"], moves
    assert report.clean, report.text()
    freezes = [m["freeze_s"] for m in moves]
    print(f"freeze durations (s): {freezes}; client retries: {dict(retried)}; acks: {len(acknowledged)}")
    print("\n".join(x for x in bench.log if "copy" not in x))


async def test_a_cancelled_move_leaves_the_range_where_it_was_and_refusals_change_nothing(bench: Bench) -> None:
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    mover = bench.mover(stop_after="frozen")
    spec = await mover.spec(*RANGE, "euw1-b")
    await mover.begin(spec)
    with pytest.raises(MoverStopped):
        await mover.run(spec)
    frozen = await bench.api.deposit(inside[0], 5)
    # A second move of a range that is moving, and a move into the shard that owns the range, are refused.
    with pytest.raises(MoveRefused, match="in progress"):
        await bench.mover().spec(RANGE[0], RANGE[0] + 10, "use1-a")
    await mover.cancel(spec)
    with pytest.raises(MoveRefused, match="already owns"):
        await bench.mover().spec(*RANGE, SOURCE)
    after = await answered(lambda: bench.api.deposit(inside[0], 5), retried)
    target = await asyncpg.connect(bench.world.shard_dsns()["euw1-b"])
    try:
        # The copies are dropped, but an account the target pre-booked before the freeze (migration 0031) keeps
        # its journal there, booked back to zero: journals are append-only (the audit trusts them so).
        copies = await target.fetchval(
            """select count(*) from accounts a where id = any($1::text[])
               and (a.balance <> 0 or not exists (select 1 from entries e where e.account_id = a.id))""", inside)
        copied_transfers = await target.fetchval(
            "select count(*) from transfers where moved_from is not null and txr_id_slot(id) between $1 and $2",
            *RANGE)
    finally:
        await target.close()
    moves = await bench.mover().moves()

    assert frozen.status_code == 503 and frozen.json()["code"] == "slot_moving", frozen.text
    assert after.status_code == 201, f"expected writes again once cancelled, got {after.text}"
    assert await bench.owner(RANGE[0]) == (SOURCE, 1)
    assert (copies, copied_transfers) == (0, 0), (
        f"expected the target's copies dropped (pre-booked accounts at zero), found {copies} accounts and "
        f"{copied_transfers} transfers")
    assert moves[0]["phase"] == "cancelled" and moves[0]["target"]["phase"] == "cancelled", moves
    report = await audit(bench.world.shard_dsns(), full=True)
    assert report.clean, report.text()


@pytest.mark.parametrize("stop_after", ["catching_up", "frozen", "switching", "switched"])
async def test_a_mover_stopped_after_a_phase_completes_the_move_when_run_again(bench: Bench, stop_after: str) -> None:
    retried: Counter[str] = Counter()
    inside, outside = await open_accounts(bench, retried)
    spec = await bench.mover().spec(*RANGE, "use1-a")
    await bench.mover().begin(spec)
    with pytest.raises(MoverStopped):
        await bench.mover(stop_after=stop_after).run(spec)
    # And a database is down for a while (the target's after the switch out, the source's under the freeze): a
    # run fails, and the re-run once it is back completes the move.
    down = {"switching": "us-east-1", "frozen": "eu-west-1"}.get(stop_after)
    if down is not None:
        bench.world.stop_postgres(down)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)):
            await bench.mover().run(spec)
        bench.world.start_postgres(down)
    respec = await bench.mover().spec(*RANGE, "use1-a")  # re-running the same move resumes it
    phase = await bench.mover().run(respec)
    transfer = await answered(lambda: bench.api.transfer(inside[0], outside[0], 10), retried)
    sent = {transfer.json()["id"]: (inside[0], outside[0], 10)} if transfer.status_code in (201, 202) else {}
    balances = await settled_balances(bench, sent, inside + outside, retried)
    report = await audit(bench.world.shard_dsns(), full=True)

    assert respec.id == spec.id, "expected the re-run to resume the recorded move"
    assert phase == "done", bench.log[-5:]
    assert transfer.status_code in (201, 202), transfer.text
    assert await bench.owner(RANGE[0]) == ("use1-a", 2)
    assert balances[inside[0]] == INITIAL_BALANCE - 10 and balances[outside[0]] == INITIAL_BALANCE + 10, balances
    assert report.clean, report.text()


async def test_the_switch_books_the_range_out_at_once_and_the_cleanup_books_each_account(bench: Bench) -> None:
    """Migration 0028: under the freeze the source books the range out in one posting per currency against its
    range account; its customer accounts keep their balances, offset by it, until the cleanup books each to zero
    after the switch. The audit is clean in between, and a move back into the source waits for that cleanup."""
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    spec = await bench.mover().spec(*RANGE, "use1-a")
    await bench.mover().begin(spec)
    with pytest.raises(MoverStopped):
        await bench.mover(stop_after="switched").run(spec)
    source_dsn = bench.world.shard_dsns()[SOURCE]

    async def source_rows() -> tuple[int, int, int, int]:
        conn = await asyncpg.connect(source_dsn)
        try:
            row = await conn.fetchrow(
                """select (select coalesce(sum(balance), 0) from accounts
                           where kind = 'customer' and slot between $1 and $2) as customers,
                          (select coalesce(sum(balance), 0) from accounts where kind = 'range'
                           and id like 'mvr_' || substr($3, 4) || '_%') as range_accounts,
                          (select count(*) from transfers where kind = 'move' and reference = $3) as postings,
                          (select count(*) from accounts where kind = 'customer' and slot between $1 and $2
                           and balance <> 0) as not_zero""",
                *RANGE, spec.id)
            return int(row["customers"]), int(row["range_accounts"]), int(row["postings"]), int(row["not_zero"])
        finally:
            await conn.close()

    switched = await source_rows()
    report_switched = await audit(bench.world.shard_dsns(), full=True)
    back = await bench.mover().spec(*RANGE, SOURCE)
    with pytest.raises(MoveRefused, match="cleanup_pending"):
        await bench.mover().begin(back)
    phase = await bench.mover().run(await bench.mover().spec(*RANGE, "use1-a"))
    done = await source_rows()
    report_done = await audit(bench.world.shard_dsns(), full=True)

    expected = INITIAL_BALANCE * len(inside)
    assert switched == (expected, -expected, 1, len(inside)), (
        f"expected the range's {expected} booked out in one posting against its range account, the accounts "
        f"untouched: (customers, range accounts, postings, accounts not at zero) = {switched}")
    assert report_switched.clean, report_switched.text()
    assert phase == "done", bench.log[-5:]
    assert done == (0, 0, 1 + len(inside), 0), (
        f"expected each account booked to zero in the cleanup and the range account at zero: {done}")
    assert report_done.clean, report_done.text()
    assert await bench.owner(RANGE[0]) == ("use1-a", 2)


@pytest.mark.parametrize("bench", [{"eu-north-1": PAUSED, "eu-west-1": PAUSED}], indirect=True)
async def test_pending_sagas_hold_the_switch_and_a_message_to_a_moved_slot_is_readdressed(bench: Bench) -> None:
    """A saga debited from the range and still pending holds the switch: the first move aborts after its bounded
    wait; the second, with the saga's message in a long relay backoff, makes it due and completes. A message
    towards the range, sent after the switch to the old owner, is re-addressed and applied once."""
    retried: Counter[str] = Counter()
    inside, outside = await open_accounts(bench, retried)
    north = next(a for a in outside if _slot(a) < RANGE[0])
    towards = await bench.api.transfer(north, inside[0], 300)  # its message waits in eu-north-1's outbox
    away = await bench.api.transfer(inside[0], north, 200)  # debited from the range; waits in eu-west-1's
    assert towards.status_code == 202 and away.status_code == 202, (towards.text, away.text)

    # A saga debited from the range is still pending: the freeze waits for it, bounded, then aborts and unfreezes.
    first = await bench.move("use1-a")
    during = await answered(lambda: bench.api.deposit(inside[1], 1), retried)
    # Its message is in the relay's backoff (as after a few failed attempts), due long after the next freeze
    # would give up on it: the mover makes it due again, so the second move completes.
    conn = await asyncpg.connect(bench.world.shard_dsns()[SOURCE])
    try:
        backed_off = await conn.execute("update outbox set next_attempt_at = clock_timestamp() + interval '1 hour' "
                                        "where transfer_id = $1", away.json()["id"])
    finally:
        await conn.close()
    await asyncio.to_thread(bench.world.restart, "eu-west-1", **dict.fromkeys(PAUSED, ""))
    second = await bench.move("use1-a")
    await settled_balances(bench, {away.json()["id"]: (inside[0], north, 200)}, [], retried)
    # Now the message towards the range is delivered to its old owner, re-addressed to the new one, applied once.
    await asyncio.to_thread(bench.world.restart, "eu-north-1", **dict.fromkeys(PAUSED, ""))
    balances = await settled_balances(bench, {towards.json()["id"]: (north, inside[0], 300)}, [inside[0], north],
                                      retried)
    report = await audit(bench.world.shard_dsns(), full=True)
    conn = await asyncpg.connect(bench.world.shard_dsns()["use1-a"])
    try:
        applied_at_new_owner = await conn.fetchval(
            "select count(*) from inbox where transfer_id = $1 and outcome = 'applied'", towards.json()["id"])
    finally:
        await conn.close()

    assert backed_off == "UPDATE 1", backed_off
    assert first == "aborted" and second == "done", (first, second, bench.log[-3:])
    north_shard = bench.world.topology.shard_for_slot(_slot(north)).name  # eun1-a or eun1-b, as the key falls
    assert any(f"still pending: {away.json()['id']} to {north_shard}: delivered False" in line
               for line in bench.log), (
        "expected the mover to name the saga that held the switch, with its outbox state",
        [line for line in bench.log if "still pending" in line])
    assert during.status_code == 201, f"expected the range writable again after the abort, got {during.text}"
    assert applied_at_new_owner == 1, "expected the re-addressed message applied once by the new owner"
    assert balances == {inside[0]: INITIAL_BALANCE - 200 + 300, north: INITIAL_BALANCE + 200 - 300}, balances
    assert report.clean, report.text()


async def test_an_open_hold_moves_with_its_account_and_the_new_owner_captures_it(bench: Bench) -> None:
    retried: Counter[str] = Counter()
    inside, _ = await open_accounts(bench, retried)
    hold = await bench.api.hold(inside[0], inside[1], 100)
    assert hold.status_code == 201, hold.text
    assert await bench.move("use1-a") == "done", bench.log[-3:]
    captured = await answered(lambda: bench.api.capture(hold.json()["id"], 60), retried)
    again = await answered(lambda: bench.api.capture(hold.json()["id"], 60), retried)
    balances = await settled_balances(bench, {}, inside[:2], retried)
    report = await audit(bench.world.shard_dsns(), full=True)

    assert captured.status_code == 201, f"expected the new owner to capture the hold, got {captured.text}"
    assert again.status_code == 409 and again.json()["code"] == "transfer_not_held", (
        f"expected a second capture refused, got {again.status_code} {again.text}")
    assert balances == {inside[0]: INITIAL_BALANCE - 60, inside[1]: INITIAL_BALANCE + 60}, balances
    assert report.clean, report.text()
