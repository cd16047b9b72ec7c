"""The hold state machine (DESIGN D14) as a hypothesis model: random holds (short or long lived), partial and full
captures, voids, expiries, sweeps and postings racing them over a few accounts of one shard, checked against the
database after every step: each outcome, each balance, held and available amount, each hold's state; available
never negative, money conserved, `held` equal to the open holds (as read, and the `accounts.held` column against
the holds the database still records as held), and each hold resolved at most once. A posting racing a hold on
one account (both sent at once) gets only what was available, in whichever order they met. Each example ends
with the audit (app/ops/audit.py, its hold checks among the rest) over every shard: clean."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.ops.audit import audit
from app.topology.model import Topology
from tests.helpers import (
    ApiClient,
    account_in_shard,
    accounts_in_one_shard,
    assert_shard_conserved,
    new_client_id,
    poll_until,
)

ACCOUNTS = 3
OVERDRAFT = {0: 0, 1: 0, 2: 100}
SHORT_S, LONG_S = 2, 3600
# A short hold this close to its time is waited past before the next step, so every step's outcome is certain.
EXPIRY_MARGIN_S = 0.8


@dataclass(frozen=True)
class Op:
    kind: str  # hold, capture, void, deposit, withdrawal, sweep, race (a withdrawal and a hold at once)
    account: int
    other: int
    amount: int
    short: bool  # a hold's lifetime: SHORT_S or LONG_S
    partial: bool  # a capture of `amount` (else of the whole hold)
    target: int  # which hold a capture or void names (modulo the holds made so far)


@dataclass
class Hold:
    id: str
    debit: int
    credit: int
    amount: int
    expires_at: dt.datetime
    state: str = "held"  # held, posted, voided, expired (recorded or not)


ops = st.builds(
    Op,
    kind=st.sampled_from(["hold", "hold", "capture", "capture", "void", "deposit", "withdrawal", "sweep", "race"]),
    account=st.integers(0, ACCOUNTS - 1),
    other=st.integers(1, ACCOUNTS - 1),
    amount=st.integers(1, 150),
    short=st.booleans(),
    partial=st.booleans(),
    target=st.integers(0, 30),
)


class Model:
    def __init__(self) -> None:
        self.balances = [0] * ACCOUNTS
        self.holds: list[Hold] = []

    def live(self, hold: Hold, now: dt.datetime) -> bool:
        return hold.state == "held" and hold.expires_at > now

    def held(self, account: int, now: dt.datetime) -> int:
        return sum(h.amount for h in self.holds if h.debit == account and self.live(h, now))

    def available(self, account: int, now: dt.datetime) -> int:
        return self.balances[account] - self.held(account, now) + OVERDRAFT[account]


async def db_now(dsn: str) -> dt.datetime:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("select clock_timestamp()")  # type: ignore[no-any-return]
    finally:
        await conn.close()


async def settle_clock(model: Model, dsn: str) -> dt.datetime:
    """The database's time, once no open hold is within EXPIRY_MARGIN_S of its expiry (waited past, polled)."""
    now = await db_now(dsn)
    close = [h for h in model.holds if h.state == "held" and
             now <= h.expires_at < now + dt.timedelta(seconds=EXPIRY_MARGIN_S)]
    if close:
        last = max(h.expires_at for h in close)

        async def past() -> bool:
            return await db_now(dsn) > last

        await poll_until(past, timeout_s=5, what="the short holds' time to pass")
        now = await db_now(dsn)
    return now


async def step(api: ApiClient, accounts: list[str], model: Model, op: Op, now: dt.datetime, dsn: str) -> None:
    """Send `op` and check its outcome against the model, which it then updates."""
    debit, credit = op.account, (op.account + op.other) % ACCOUNTS
    if op.kind == "deposit":
        response = await api.deposit(accounts[debit], op.amount)
        assert response.status_code == 201, response.text
        model.balances[debit] += op.amount
    elif op.kind == "withdrawal":
        response = await api.withdraw(accounts[debit], op.amount)
        expected = 201 if model.available(debit, now) >= op.amount else 422
        assert response.status_code == expected, f"{op}: expected {expected}, got {response.text}"
        if expected == 201:
            model.balances[debit] -= op.amount
    elif op.kind == "hold":
        response = await api.hold(accounts[debit], accounts[credit], op.amount,
                                  expires_in_s=SHORT_S if op.short else LONG_S)
        expected = 201 if model.available(debit, now) >= op.amount else 422
        assert response.status_code == expected, f"{op}: expected {expected}, got {response.text}"
        if expected == 201:
            body = response.json()
            assert body["state"] == "held", body
            expires = dt.datetime.fromisoformat(body["hold"]["expires_at"])
            model.holds.append(Hold(body["id"], debit, credit, op.amount, expires))
    elif op.kind in ("capture", "void") and model.holds:
        await resolve(api, model, op, now)
    elif op.kind == "race":
        await race(api, accounts, model, op, now)
    elif op.kind == "sweep":
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("select txr_holds_expire(100)")
        finally:
            await conn.close()
    for hold in model.holds:
        if hold.state == "held" and hold.expires_at <= now:
            hold.state = "expired"  # in effect at its time, whether recorded yet or not


async def race(api: ApiClient, accounts: list[str], model: Model, op: Op, now: dt.datetime) -> None:
    """A withdrawal and a hold on one account sent at once: whichever the shard took first, neither may spend
    what the other reserved or took; each refusal is insufficient_funds and only possible when its amount did
    not fit beside what the other got."""
    debit, credit = op.account, (op.account + op.other) % ACCOUNTS
    taken = op.amount * 7 % 150 + 1
    withdrawal, hold = await asyncio.gather(
        api.withdraw(accounts[debit], taken),
        api.hold(accounts[debit], accounts[credit], op.amount, expires_in_s=SHORT_S if op.short else LONG_S),
    )
    available = model.available(debit, now)
    for response in (withdrawal, hold):
        assert response.status_code in (201, 422), f"{op}: {response.text}"
        if response.status_code == 422:
            assert response.json()["code"] == "insufficient_funds", f"{op}: {response.text}"
    took, held = withdrawal.status_code == 201, hold.status_code == 201
    got = (taken if took else 0) + (op.amount if held else 0)
    assert got <= available, f"{op}: {got} spent or held of {available} available"
    assert took or taken > available - (op.amount if held else 0), f"{op}: the withdrawal was refused with room"
    assert held or op.amount > available - (taken if took else 0), f"{op}: the hold was refused with room"
    if took:
        model.balances[debit] -= taken
    if held:
        body = hold.json()
        assert body["state"] == "held", body
        model.holds.append(Hold(body["id"], debit, credit, op.amount,
                                dt.datetime.fromisoformat(body["hold"]["expires_at"])))


async def resolve(api: ApiClient, model: Model, op: Op, now: dt.datetime) -> None:
    hold = model.holds[op.target % len(model.holds)]
    open_now = model.live(hold, now)
    if op.kind == "void":
        response = await api.void(hold.id)
        if not open_now:
            assert response.json().get("code") == "transfer_not_held", f"{op}: {response.text}"
            return
        assert response.status_code == 200 and response.json()["state"] == "voided", f"{op}: {response.text}"
        hold.state = "voided"
        return
    amount = op.amount if op.partial else None
    response = await api.capture(hold.id, amount)
    if not open_now:
        assert response.json().get("code") == "transfer_not_held", f"{op}: {response.text}"
        return
    if amount is not None and amount > hold.amount:
        assert response.json().get("code") == "capture_exceeds_hold", f"{op}: {response.text}"
        return
    assert response.status_code == 201, f"{op}: {response.text}"
    captured = hold.amount if amount is None else amount
    assert (response.json()["state"], response.json()["amount"]) == ("posted", captured), response.text
    model.balances[hold.debit] -= captured
    model.balances[hold.credit] += captured
    hold.state = "posted"


async def check(api: ApiClient, accounts: list[str], model: Model, dsn: str, now: dt.datetime, where: str) -> None:
    for i, account in enumerate(accounts):
        body = (await api.account(account)).json()
        expected = (model.balances[i], model.held(i, now), model.available(i, now))
        assert (body["balance"], body["held"], body["available"]) == expected, f"{where}: account {i} {body}"
        assert body["available"] >= 0, f"{where}: account {i} has less than nothing available"
    for hold in model.holds:
        state = (await api.get(f"/v1/transfers/{hold.id}")).json()["state"]
        assert state == hold.state, f"{where}: expected hold {hold.id} {hold.state}, read {state}"
    await assert_shard_conserved(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        twice = await conn.fetch(
            """select transfer_id, count(*) from transfer_events
               where transfer_id = any($1::text[]) and seq > 1 group by transfer_id having count(*) > 1""",
            [h.id for h in model.holds])
        columns = {r["id"]: r["held"] for r in await conn.fetch(
            "select id, held from accounts where id = any($1::text[])", accounts)}
        recorded = {r["id"]: r["state"] for r in await conn.fetch(
            "select id, state from transfers where id = any($1::text[])", [h.id for h in model.holds])}
    finally:
        await conn.close()
    assert not twice, f"{where}: expected each hold resolved at most once, got {[dict(r) for r in twice]}"
    # The stored state: an open hold is `held`; one past its time `held` until a sweeper records `expired`.
    for hold in model.holds:
        allowed = ("held", "expired") if hold.state == "expired" else (hold.state,)
        assert recorded[hold.id] in allowed, f"{where}: hold {hold.id} is {hold.state}, stored {recorded[hold.id]}"
    # `accounts.held` is the sum of the holds stored as `held`: the open ones and those past their time that no
    # sweeper has recorded yet (reads and postings leave those out by their time, txr_held).
    for i, account in enumerate(accounts):
        stored = sum(h.amount for h in model.holds if h.debit == i and recorded[h.id] == "held")
        assert columns[account] == stored, (
            f"{where}: account {i}'s held column is {columns[account]}, its holds stored as held sum to {stored} "
            f"({model.held(i, now)} of them open)")


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(ops, min_size=1, max_size=14))
async def test_holds_captures_voids_and_expiries_agree_with_a_model_after_every_step(
    http: httpx.AsyncClient, topology: Topology, shard_dsn: Callable[[str], str], sequence: list[Op]
) -> None:
    api = ApiClient(http, new_client_id("holdprop"))  # a fresh client per example: examples never interfere
    shard, accounts = await accounts_in_one_shard(api, topology, ACCOUNTS - 1)
    accounts.append(await account_in_shard(api, topology, shard, overdraft_limit=OVERDRAFT[ACCOUNTS - 1]))
    dsn = shard_dsn(shard)
    model = Model()
    for i in range(ACCOUNTS - 1):  # something to hold
        await api.funded(accounts[i], 200)
        model.balances[i] += 200
    for n, op in enumerate(sequence):
        now = await settle_clock(model, dsn)
        await step(api, accounts, model, op, now, dsn)
        await check(api, accounts, model, dsn, now, f"step {n} {op}")
    # The audit's own checks (held against the open holds, available not negative, money conserved, ...) over
    # every shard, as `txroute audit --full` runs them; no checkpoint written, so nothing else is affected.
    report = await audit({s.name: shard_dsn(s.name) for s in topology.shards}, full=True, save_checkpoint=False)
    assert report.clean, f"expected a clean audit after the example, got:\n{report.text()}"
