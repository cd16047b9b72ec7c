"""The hold state machine (DESIGN D14) as a hypothesis model: random holds (short or long lived), partial and full
captures, voids, expiries, sweeps and postings racing them over a few accounts of one shard, checked against the
database after every step: each outcome, each balance, held and available amount, each hold's state; available
never negative, money conserved, `held` equal to the open holds, and each hold resolved at most once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    kind: str  # hold, capture, void, deposit, withdrawal, sweep
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
    kind=st.sampled_from(["hold", "hold", "capture", "capture", "void", "deposit", "withdrawal", "sweep"]),
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
    elif op.kind == "sweep":
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("select txr_holds_expire(100)")
        finally:
            await conn.close()
    for hold in model.holds:
        if hold.state == "held" and hold.expires_at <= now:
            hold.state = "expired"  # in effect at its time, whether recorded yet or not


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
    finally:
        await conn.close()
    assert not twice, f"{where}: expected each hold resolved at most once, got {[dict(r) for r in twice]}"


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
