"""Holds (DESIGN D14), closing accounts, balance as of a time and metadata (issue 12), against the real service
and its databases: each rule as the client sees it, the ledger conserved after it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import asyncpg
import httpx

from app import limits
from app.store.shard import AS_OF_SQL, TransfersQuery, account_transfers_sql
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.helpers import (
    ApiClient,
    account_in_shard,
    accounts_in_one_shard,
    assert_shard_conserved,
    new_key,
    poll_until,
    shard_of,
)


def assert_code(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, f"expected {status} {code}, got {response.status_code} {response.text}"
    assert response.json()["code"] == code, f"expected code {code}, got {response.json()['code']}"


async def money(api: ApiClient, account: str) -> tuple[int, int, int]:
    body = (await api.account(account)).json()
    return body["balance"], body["held"], body["available"]


async def test_a_hold_reserves_funds_and_a_partial_capture_posts_part_and_releases_the_rest(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 100)
    held = await api.hold(a, b, 70, metadata={"order": "o-1"})
    assert held.status_code == 201, held.text
    hold = held.json()
    assert (hold["state"], hold["amount"], hold["hold"]["amount"], hold["metadata"]) == ("held", 70, 70,
                                                                                         {"order": "o-1"}), hold
    assert await money(api, a) == (100, 70, 30), "expected 70 held and 30 available"
    assert_code(await api.withdraw(a, 31), 422, "insufficient_funds")
    assert_code(await api.hold(a, b, 31), 422, "insufficient_funds")
    assert_code(await api.capture(hold["id"], 71), 422, "capture_exceeds_hold")

    key = new_key()
    captured = await api.capture(hold["id"], 50, key=key)
    assert captured.status_code == 201, captured.text
    assert (captured.json()["state"], captured.json()["amount"]) == ("posted", 50), captured.text
    assert await money(api, a) == (50, 0, 50), "expected 50 posted and the other 20 released"
    assert await money(api, b) == (50, 0, 50)
    replay = await api.capture(hold["id"], 50, key=key)
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true", replay.text
    assert_code(await api.capture(hold["id"], 50), 409, "transfer_not_held")
    assert_code(await api.void(hold["id"]), 409, "transfer_not_held")

    read = (await api.get(f"/v1/transfers/{hold['id']}")).json()
    assert [h["state"] for h in read["history"]] == ["held", "posted"], read
    await assert_shard_conserved(shard_dsn(shard))


async def test_a_voided_hold_releases_everything_once(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 40)
    hold = (await api.hold(a, b, 40)).json()
    key = new_key()
    voided = await api.void(hold["id"], key=key)
    assert voided.status_code == 200 and voided.json()["state"] == "voided", voided.text
    assert (await api.void(hold["id"], key=key)).headers.get("idempotent-replayed") == "true"
    assert_code(await api.void(hold["id"]), 409, "transfer_not_held")
    assert_code(await api.capture(hold["id"]), 409, "transfer_not_held")
    assert await money(api, a) == (40, 0, 40)
    assert await money(api, b) == (0, 0, 0)
    assert_code(await api.capture("trf_" + hold["id"][4:7] + "0" * 26), 404, "transfer_not_found")
    await assert_shard_conserved(shard_dsn(shard))


async def test_a_hold_expires_at_its_time_in_reads_and_postings_before_any_sweep(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 10)
    hold = (await api.hold(a, b, 10, expires_in_s=1)).json()
    assert_code(await api.withdraw(a, 1), 422, "insufficient_funds")

    async def released() -> bool:
        return (await money(api, a))[1] == 0

    await poll_until(released, timeout_s=5, what="the hold to stop counting once its second is over")
    read = (await api.get(f"/v1/transfers/{hold['id']}")).json()
    assert read["state"] == "expired", read
    assert_code(await api.capture(hold["id"]), 409, "transfer_not_held")
    assert_code(await api.void(hold["id"]), 409, "transfer_not_held")
    assert (await api.withdraw(a, 10)).status_code == 201, "expected the expired hold's funds to be spendable"

    async def recorded() -> bool:  # the region's sweeper records it
        history = (await api.get(f"/v1/transfers/{hold['id']}")).json()["history"]
        return [h["state"] for h in history] == ["held", "expired"]

    await poll_until(recorded, timeout_s=10, what="the sweeper to record the expiry")
    await assert_shard_conserved(shard_dsn(shard))


async def test_listing_an_accounts_transfers_by_state_follows_a_hold_past_its_time_before_any_sweep(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    # The body of a hold past its time says `expired` before the sweeper records it; `?state=` must agree.
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 10)
    hold = (await api.hold(a, b, 10, expires_in_s=3600)).json()
    listed = (await api.get(f"/v1/accounts/{a}/transfers?state=held")).json()["items"]
    assert [t["id"] for t in listed] == [hold["id"]], listed
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        # Its time passed inside a transaction never committed: the sweeper cannot record it meanwhile.
        tx = conn.transaction()
        await tx.start()
        await conn.execute("set local session_replication_role = replica")  # a transfer's columns are guarded
        await conn.execute("update transfers set hold_expires_at = clock_timestamp() - interval '1 second' "
                           "where id = $1", hold["id"])
        await conn.execute("set local session_replication_role = origin")

        async def by_state(state: str) -> list[tuple[str, str]]:
            sql, args = account_transfers_sql(a, api.client_id, TransfersQuery(limit=10, state=state))
            return [(r["id"], json.loads(r["body"])["state"]) for r in await conn.fetch(sql, *args)]

        assert await by_state("held") == [], "expected a hold past its time not to list as held"
        assert await by_state("expired") == [(hold["id"], "expired")], "expected it to list as expired"
        await tx.rollback()
    finally:
        await conn.close()


async def test_a_withdrawal_can_be_held_and_captured_and_a_deposit_cannot_be_held(
    api: ApiClient, shard_dsn: Callable[[str], str], topology: Topology
) -> None:
    a = await api.new_account()
    await api.funded(a, 25)
    held = await api.post("/v1/withdrawals", {"account": a, "amount": 20, "currency": "EUR",
                                              "hold": {"expires_in_s": 60}})
    assert held.status_code == 201 and held.json()["state"] == "held", held.text
    assert await money(api, a) == (25, 20, 5)
    captured = await api.capture(held.json()["id"])
    assert captured.status_code == 201 and captured.json()["amount"] == 20, captured.text
    assert await money(api, a) == (5, 0, 5)
    refused = await api.post("/v1/deposits", {"account": a, "amount": 5, "currency": "EUR",
                                              "hold": {"expires_in_s": 60}})
    assert_code(refused, 422, "hold_not_supported")
    for bad in (0, 604_801):
        response = await api.post("/v1/withdrawals", {"account": a, "amount": 1, "currency": "EUR",
                                                      "hold": {"expires_in_s": bad}})
        assert_code(response, 400, "invalid_request")
    await assert_shard_conserved(shard_dsn(shard_of(topology, a)))


async def test_capturing_a_hold_whose_credit_is_on_another_shard_runs_the_saga(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    a = await api.new_account()
    here = shard_of(topology, a)
    other = next(s.name for s in topology.region("eu-west-1").shards if s.name != here)
    b = await account_in_shard(api, topology, other)
    await api.funded(a, 100)
    hold = (await api.hold(a, b, 60)).json()
    assert hold["state"] == "held"
    captured = await api.capture(hold["id"], 45)
    assert captured.status_code in (201, 202), captured.text

    async def posted() -> bool:
        return bool((await api.get(f"/v1/transfers/{hold['id']}")).json()["state"] == "posted")

    await poll_until(posted, timeout_s=10, what="the captured hold's saga to post")
    assert await money(api, a) == (55, 0, 55)
    assert await money(api, b) == (45, 0, 45)
    history = [h["state"] for h in (await api.get(f"/v1/transfers/{hold['id']}")).json()["history"]]
    assert history == ["held", "pending", "posted"], history
    for shard in (here, other):
        await assert_shard_conserved(shard_dsn(shard))


async def test_only_an_empty_account_closes_and_a_closed_one_refuses_postings_but_reads(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 30)
    assert_code(await api.close(a), 409, "account_not_empty")
    hold = (await api.hold(a, b, 30)).json()
    assert (await api.withdraw(a, 30)).status_code == 422, "expected the held funds not to be withdrawable"
    await api.void(hold["id"])
    assert (await api.withdraw(a, 30)).status_code == 201
    assert (await api.deposit(b, 5)).status_code == 201
    open_hold = (await api.hold(b, a, 5)).json()
    assert_code(await api.close(b), 409, "account_not_empty")  # balance 5 and 5 held
    assert (await api.void(open_hold["id"])).status_code == 200

    key = new_key()
    closed = await api.close(a, key=key)
    assert closed.status_code == 200, closed.text
    assert closed.json()["status"] == "closed" and "closed_at" in closed.json(), closed.text
    assert (await api.close(a, key=key)).headers.get("idempotent-replayed") == "true"
    assert (await api.close(a)).status_code == 200, "expected closing a closed account to answer it as it is"
    assert_code(await api.deposit(a, 1), 422, "account_closed")
    assert_code(await api.transfer(b, a, 1), 422, "account_closed")
    assert_code(await api.hold(b, a, 1), 422, "account_closed")
    assert (await api.account(a)).json()["status"] == "closed", "expected a closed account to read"
    assert_code(await other_client_close(api, a), 404, "account_not_found")
    await assert_shard_conserved(shard_dsn(shard))


async def other_client_close(api: ApiClient, account: str) -> httpx.Response:
    return await ApiClient(api.http, api.client_id + "-other").close(account)


async def test_metadata_is_returned_on_reads_and_bad_metadata_writes_nothing(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    opened = await api.post("/v1/accounts", {"currency": "EUR", "metadata": {"customer": "c-42", "tier": ""}})
    assert opened.status_code == 201, opened.text
    account = opened.json()["id"]
    assert (await api.account(account)).json()["metadata"] == {"customer": "c-42", "tier": ""}
    bads = [
        {f"k{i}": "v" for i in range(21)},
        {"k": "v" * 501},
        {"": "v"},
        {"k" * 41: "v"},
        {"k": 1},
        ["k", "v"],
    ]
    for bad in bads:
        key = new_key()
        response = await api.post("/v1/accounts", {"currency": "EUR", "metadata": bad}, key=key)
        assert_code(response, 400, "invalid_metadata")
        response = await api.post("/v1/deposits", {"account": account, "amount": 1, "currency": "EUR",
                                                   "metadata": bad})
        assert_code(response, 400, "invalid_metadata")
    assert await api.balance(account) == 0, "expected nothing written for bad metadata"
    deposit = await api.post("/v1/deposits", {"account": account, "amount": 3, "currency": "EUR",
                                              "metadata": {"invoice": "inv-7"}})
    assert deposit.status_code == 201, deposit.text
    read = (await api.get(f"/v1/transfers/{deposit.json()['id']}")).json()
    assert read["metadata"] == {"invoice": "inv-7"}, read
    await assert_shard_conserved(shard_dsn(shard_of(topology, account)))


async def test_the_balance_and_held_as_of_a_time_come_from_the_journal(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    for amount in (10, 20, 30):
        await api.funded(a, amount)
    await api.withdraw(a, 5)
    hold = (await api.hold(a, b, 15)).json()
    await api.capture(hold["id"], 15)
    entries = list(reversed(await api.all_entries(a)))  # oldest first
    assert [e["balance_after"] for e in entries] == [10, 30, 60, 55, 40], entries

    for entry in entries:  # the hold was opened after the withdrawal and resolved in the capture's instant
        body = (await api.account(a, as_of=entry["created_at"])).json()
        assert (body["balance"], body["held"], body["as_of"]) == (entry["balance_after"], 0, entry["created_at"]), body
    history = (await api.get(f"/v1/transfers/{hold['id']}")).json()["history"]
    during = history[0]["at"]
    body = (await api.account(a, as_of=during)).json()
    assert (body["balance"], body["held"], body["available"]) == (55, 15, 40), body
    before = (await api.account(a, as_of="2000-01-01T00:00:00Z")).json()
    assert (before["balance"], before["held"]) == (0, 0), before
    assert_code(await api.account(a, as_of="yesterday"), 400, "invalid_as_of")
    assert_code(await api.account(a, as_of="2026-01-01T00:00:00"), 400, "invalid_as_of")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    assert_code(await api.account(a, as_of=future), 400, "invalid_as_of")
    await assert_shard_conserved(shard_dsn(shard))


async def test_the_as_of_read_is_one_statement_on_indexes(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """The statement the store runs (AS_OF_SQL) can be answered on indexes alone: the balance by one probe of
    entries_account_time (no sort), the holds by an index range. The test tables are small, where a sequential
    scan is cheaper, so the plan is asked for with sequential scans priced out."""
    a = await api.new_account()
    await api.funded(a, 10)
    shard = shard_of(topology, a)
    b = await account_in_shard(api, topology, shard)
    hold = (await api.hold(a, b, 5)).json()
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        await conn.execute("set enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "explain (costs off) " + AS_OF_SQL, a, api.client_id, parse_account_id(a).slot,
            dt.datetime.fromisoformat(hold["created_at"]), limits.HOLD_EXPIRES_IN_S_MAX))
    finally:
        await conn.close()
    assert "Index Scan using entries_account_time" in plan and "Sort" not in plan, plan
    assert "Index Scan using transfers_holds_by_account" in plan and "Seq Scan" not in plan, plan
