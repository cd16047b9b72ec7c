"""A slot move (issue 11) of an account with holds, a unique-reference lookup and a refused atomic batch, through
the router, on a world of its own: the account reads the same on its new shard, its holds are captured and voided
there (one capture a saga back to the old shard), a replay of the refused batch is still refused, the reference
lookup lists each transfer once, every event is written once, and the audit is clean."""

from __future__ import annotations

import datetime
import json
from collections import Counter
from typing import Any

import asyncpg
import httpx

from app.ops.audit import audit
from app.store.shard import REFERENCE_SQL
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi
from tests.e2e.test_events_slot_move import _move, _other_shard, moving_world  # noqa: F401 - the fixture
from tests.events_support import committed_events
from tests.helpers import accounts_in_one_shard, new_client_id, new_key, poll_until, shard_of
from tests.keys import SessionKeys


async def _money(api: RouterApi, account: str) -> tuple[int, int, int]:
    response = await api.account(account)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["balance"], body["held"], body["available"]


async def test_holds_a_refused_batch_references_and_events_come_through_a_move_whole(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        shard, (debit, credit) = await accounts_in_one_shard(api, topology, 2)
        await api.funded(debit, 1_000)
        captured = await api.hold(debit, credit, 300)
        voided = await api.hold(debit, credit, 100)
        paid = await api.post("/v1/transfers", {"debit_account": debit, "credit_account": credit, "amount": 50,
                                                "currency": "EUR", "reference": "inv-7", "unique_reference": True})
        assert captured.status_code == voided.status_code == paid.status_code == 201, (
            captured.text, voided.text, paid.text)
        batch_key = new_key()
        batch: dict[str, Any] = {"atomic": True, "items": [
            {"type": "withdrawal", "account": debit, "amount": 5_000, "currency": "EUR"}]}
        refused = await api.post("/v1/batches", batch, key=batch_key)
        assert refused.status_code == 422 and refused.json()["code"] == "batch_refused", refused.text
        before = await _money(api, debit)

        moved_to = await _move(moving_world, topology, parse_account_id(debit).slot)
        assert moved_to != shard

        assert await _money(api, debit) == before == (950, 400, 550), (
            f"expected balance, held and available unchanged by the move: {before}")
        capture = await api.capture(captured.json()["id"], 200)
        void = await api.void(voided.json()["id"])
        # A saga back to the old shard (where the credit account stayed): posted at once by the fast path, or
        # pending until the relay delivers it.
        assert capture.status_code in (201, 202), f"expected the capture taken: {capture.text}"
        assert void.status_code == 200, void.text
        await api.funded(debit, 5_000)
        replay = await api.post("/v1/batches", batch, key=batch_key)
        assert replay.status_code == 422 and replay.json()["code"] == "batch_refused", (
            f"expected the refused batch replayed after the move, not posted: {replay.status_code} {replay.text}")

        lookup = await api.get("/v1/transfers", params={"reference": "inv-7"})
        assert lookup.status_code == 200, lookup.text
        assert [t["id"] for t in lookup.json()["items"]] == [paid.json()["id"]], (
            f"expected the transfer listed once, by its new shard: {lookup.json()}")

        async def settled() -> bool:
            response = await api.get(f"/v1/transfers/{captured.json()['id']}")
            return response.status_code == 200 and response.json()["state"] == "posted"

        await poll_until(settled, timeout_s=60, what="the capture's saga settled")
        assert await _money(api, debit) == (5_750, 0, 5_750)
        assert await api.balance(credit) == 250

    events = await committed_events(moving_world.clusters, topology, client)
    counts = Counter((e["type"], e["resource"]) for e in events)
    assert all(n == 1 for n in counts.values()), f"expected every event once: {counts}"
    hold_events = [e["type"] for e in events if e["resource"] == captured.json()["id"]]
    assert sorted(hold_events) == ["transfer.captured", "transfer.held", "transfer.posted"], hold_events
    assert ("transfer.voided", voided.json()["id"]) in counts, counts
    report = await moving_world.audit()
    assert report.clean, report.text()

    # A region whose view of the move is stale still routes a transfer into the moved account as a same-shard
    # posting on the old shard, where the moved-account fence (migration 0014, SQLSTATE TXR02) stops it. In an
    # atomic batch, that must abort the call, not read as the batch's own "an item was refused" and store a 201.
    conn = await asyncpg.connect(moving_world.shard_dsns()[shard])
    try:
        key = new_key()
        item = {"kind": "transfer", "id": "trf_" + credit[4:], "slot": parse_account_id(credit).slot,
                "client": client, "key": key + " #0", "fingerprint": "f", "debit": credit, "credit": debit,
                "amount": 10, "currency": "EUR", "reference": None, "metadata": None, "hold_expires_in_s": None,
                "credit_remote": False, "unique_reference": False}
        try:
            answer = await conn.fetchval("select txr_post_atomic($1, $2, 'f', $3::jsonb, 1000)::text",
                                         client, key, json.dumps([item]))
        except asyncpg.PostgresError as exc:
            answer = exc.sqlstate
        stored = await conn.fetchval("select count(*) from idempotency where client = $1 and key = $2", client, key)
    finally:
        await conn.close()
    assert answer == "TXR02" and stored == 0, (
        f"expected the fence's TXR02 to abort the batch with nothing stored, got {answer} and {stored} rows")


async def test_a_slot_moves_away_and_back_and_its_first_shard_serves_it_again_with_its_stored_answers(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    """Evacuate, then return after maintenance: the range goes back to a shard that still records it `moved`."""
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        home, (debit, credit) = await accounts_in_one_shard(api, topology, 2)
        await api.funded(debit, 1_000)
        before_key = new_key()
        before = await api.transfer(debit, credit, 100, key=before_key)
        assert before.status_code == 201, before.text
        slot = parse_account_id(debit).slot
        away = await _move(moving_world, topology, slot)
        assert (await api.transfer(debit, credit, 10)).status_code == 201
        assert away != home
        await _move(moving_world, topology, slot, to=home)  # back to the shard it left
        after = await api.transfer(debit, credit, 1)
        replay = await api.transfer(debit, credit, 100, key=before_key)
        conn = await asyncpg.connect(moving_world.shard_dsns()[home])
        try:
            owned = await conn.fetchval(
                "select state from slot_ownership where $1 between slot_lo and slot_hi", slot)
        finally:
            await conn.close()
        balances = ((await _money(api, debit))[0], (await _money(api, credit))[0])
    assert after.status_code == 201, after.text
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true", replay.text
    assert replay.json() == before.json(), "expected the stored answer of before both moves"
    assert owned == "owned", f"expected {home} to own the slot again, got {owned}"
    assert balances == (1_000 - 111, 111), f"expected each transfer posted once, got {balances}"
    report = await audit(moving_world.shard_dsns(), full=True)
    assert report.clean, report.text()


async def test_a_withdrawal_hold_captured_after_its_slot_moved_credits_the_new_shards_settlement_account(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    """A withdrawal hold names its shard's settlement account as its credit; the move copies it as it is, and on the
    new owner that account does not exist: the capture read no credit row and its entry failed (500). The capture
    credits the settlement account of the shard that captures it (migration 0038), and the void releases as
    before; the audit (entries against each transfer's accounts, money conserved per shard) stays clean."""
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        account = await api.new_account()
        home = shard_of(topology, account)
        await api.funded(account, 1_000)
        held, released = [await api.post("/v1/withdrawals", {"account": account, "amount": amount, "currency": "EUR",
                                                              "hold": {"expires_in_s": 3600}})
                          for amount in (300, 100)]
        assert held.status_code == released.status_code == 201, (held.text, released.text)
        assert held.json()["state"] == released.json()["state"] == "held", (held.text, released.text)

        moved_to = await _move(moving_world, topology, parse_account_id(account).slot)
        assert moved_to != home
        assert await _money(api, account) == (1_000, 400, 600)

        capture_key = new_key()
        capture = await api.capture(held.json()["id"], 250, key=capture_key)
        void = await api.void(released.json()["id"])
        assert capture.status_code == 201 and capture.json()["state"] == "posted", (
            f"expected the withdrawal hold captured on its new shard, got {capture.status_code} {capture.text}")
        assert void.status_code == 200 and void.json()["state"] == "voided", void.text
        assert await _money(api, account) == (750, 0, 750)
        replay = await api.capture(held.json()["id"], 250, key=capture_key)
        assert replay.status_code == 201 and replay.json() == capture.json(), replay.text

    conn = await asyncpg.connect(moving_world.shard_dsns()[moved_to])
    try:
        row = await conn.fetchrow("select credit_account, state, amount, moved_from from transfers where id = $1",
                                  held.json()["id"])
        entries = sorted(tuple(r) for r in await conn.fetch(
            "select account_id, amount from entries where transfer_id = $1", held.json()["id"]))
    finally:
        await conn.close()
    settlement = f"set_{moved_to}_EUR"
    assert dict(row) == {"credit_account": settlement, "state": "posted", "amount": 250, "moved_from": None}, dict(row)
    assert entries == sorted([(account, -250), (settlement, 250)]), entries
    report = await moving_world.audit()
    assert report.clean, report.text()


async def test_a_balance_as_of_a_time_before_the_account_arrived_by_a_move_is_refused_and_after_it_exact(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    """Entries do not move with a slot: the new owner's journal of a moved account starts with the move's
    bookings, so a time before the switch read 0 (or a pre-booking) there. It is refused, 422 as_of_before_move
    naming the earliest time the shard answers for the account (its switch); from that time on the answer is the
    journal's, exact."""
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        account = await api.new_account()
        await api.funded(account, 100)
        before_move = datetime.datetime.now(datetime.UTC).isoformat()
        read_before = await api.account(account, as_of=before_move)
        assert read_before.status_code == 200 and read_before.json()["balance"] == 100, read_before.text
        await api.funded(account, 20)
        held = await api.hold(account, await api.new_account(), 30)
        assert held.status_code == 201, held.text

        await _move(moving_world, topology, parse_account_id(account).slot)
        await api.funded(account, 5)

        refused = await api.account(account, as_of=before_move)
        assert refused.status_code == 422 and refused.json()["code"] == "as_of_before_move", (
            f"expected a time before the move refused, got {refused.status_code} {refused.text}")
        assert refused.headers["content-type"].startswith("application/problem+json"), refused.headers
        earliest = refused.json()["earliest"]
        assert datetime.datetime.fromisoformat(earliest) > datetime.datetime.fromisoformat(before_move), refused.text
        at_arrival = await api.account(account, as_of=earliest)
        assert at_arrival.status_code == 200, at_arrival.text
        assert (at_arrival.json()["balance"], at_arrival.json()["held"]) == (120, 30), (
            f"expected the balance and held at the move, exactly: {at_arrival.text}")
        now = await api.account(account, as_of=datetime.datetime.now(datetime.UTC).isoformat())
        assert (now.status_code, now.json()["balance"], now.json()["held"]) == (200, 125, 30), now.text
        just_before = (datetime.datetime.fromisoformat(earliest) - datetime.timedelta(microseconds=1)).isoformat()
        assert (await api.account(account, as_of=just_before)).status_code == 422


async def test_the_reference_lookup_lists_each_cross_shard_transfer_once_after_its_debit_slot_moved(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    """The copy of a saga's debit-side row keeps naming its source as `debit_shard`; each shard listed only rows
    whose debit shard it is, so after the move no shard listed a cross-shard transfer or captured hold of the
    range (the source's slot is `moved`). Each is listed once, by the slot's new owner: a saga to another region,
    a hold captured there, and a saga to the move's own target (whose credit row the copy joined)."""
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        debit = (await api.open_account(region="eu-west-1")).json()["id"]
        far = (await api.open_account(region="us-east-1")).json()["id"]
        home = shard_of(topology, debit)
        target = _other_shard(topology, parse_account_id(debit).slot)
        near = (await api.open_account(region="eu-west-1")).json()["id"]
        while shard_of(topology, near) != target:  # placement hashes the key: open until one lands there
            near = (await api.open_account(region="eu-west-1")).json()["id"]
        await api.funded(debit, 1_000)
        reference = "inv-" + new_key()[-8:]
        sent = await api.post("/v1/transfers", {"debit_account": debit, "credit_account": far, "amount": 100,
                                                "currency": "EUR", "reference": reference})
        hold = await api.post("/v1/transfers", {"debit_account": debit, "credit_account": far, "amount": 50,
                                                "currency": "EUR", "reference": reference,
                                                "hold": {"expires_in_s": 3600}})
        assert hold.status_code == 201, hold.text
        captured = await api.capture(hold.json()["id"])
        to_target = await api.post("/v1/transfers", {"debit_account": debit, "credit_account": near, "amount": 10,
                                                     "currency": "EUR", "reference": reference})
        ids = {sent.json()["id"], hold.json()["id"], to_target.json()["id"]}
        for response in (sent, captured, to_target):
            assert response.status_code in (201, 202), response.text

        async def settled() -> bool:
            states = [(await api.get(f"/v1/transfers/{i}")).json().get("state") for i in ids]
            return states == ["posted"] * 3

        await poll_until(settled, timeout_s=60, what="the sagas settled")
        assert await _move(moving_world, topology, parse_account_id(debit).slot, to=target) != home

        lookup = await api.get("/v1/transfers", params={"reference": reference})
        listing = await api.get(f"/v1/accounts/{debit}/transfers")
    assert lookup.status_code == 200 and listing.status_code == 200, (lookup.text, listing.text)
    assert sorted(t["id"] for t in lookup.json()["items"]) == sorted(ids), (
        f"expected each transfer listed by the lookup after the move: {lookup.json()}")
    assert {t["id"] for t in listing.json()["items"]} >= ids, listing.json()
    # Across shards (the router merges by id, so count the shards' own answers): each transfer exactly once.
    found: Counter[str] = Counter()
    for dsn in moving_world.shard_dsns().values():
        conn = await asyncpg.connect(dsn)
        try:
            found.update(r["id"] for r in await conn.fetch(REFERENCE_SQL, client, reference, 100))
        finally:
            await conn.close()
    assert found == Counter(dict.fromkeys(ids, 1)), f"expected each transfer listed by one shard once: {found}"
    report = await moving_world.audit()
    assert report.clean, report.text()


async def test_an_accounts_transfer_listing_after_its_slot_moved_says_from_when_it_is_complete(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    """The listing reads the account's own shard. A transfer into the account from a slot that did not move with it
    stays on the shard it left, so after the move the new shard's listing cannot hold it: the page says from when
    it is complete (`complete_from`, the switch), and lists what moved with the account and what came after."""
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        _, (payer, payee) = await accounts_in_one_shard(api, topology, 2)
        while parse_account_id(payer).slot == parse_account_id(payee).slot:
            _, (payer, payee) = await accounts_in_one_shard(api, topology, 2)
        await api.funded(payer, 100)
        into = await api.transfer(payer, payee, 40)
        back = await api.transfer(payee, payer, 10)
        assert into.status_code == back.status_code == 201, (into.text, back.text)
        before = await api.get(f"/v1/accounts/{payee}/transfers")
        await _move(moving_world, topology, parse_account_id(payee).slot)
        later = await api.transfer(payer, payee, 5)
        assert later.status_code in (201, 202), later.text

        async def settled() -> bool:
            return (await api.get(f"/v1/transfers/{later.json()['id']}")).json()["state"] == "posted"

        await poll_until(settled, timeout_s=60, what="the saga into the moved account settled")
        after = await api.get(f"/v1/accounts/{payee}/transfers")
    assert before.status_code == after.status_code == 200, (before.text, after.text)
    assert "complete_from" not in before.json(), before.json()
    complete_from = datetime.datetime.fromisoformat(after.json()["complete_from"])
    assert complete_from > datetime.datetime.fromisoformat(into.json()["created_at"]), after.json()
    listed = {t["id"] for t in after.json()["items"]}
    assert {back.json()["id"], later.json()["id"]} <= listed, (
        f"expected what moved with the account and what came after listed: {after.json()}")
