"""Idempotency (DESIGN D5): a replay answers the stored response and has no second effect; a key reused
for another body is refused; a key in flight is refused; many concurrent copies of one request move money
once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import asyncpg

from app.topology.model import Topology
from tests.helpers import ApiClient, accounts_in_one_shard, new_key, shard_of

REPLAYED = "Idempotent-Replayed"


async def _transfer_rows(dsn: str, client: str, reference: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "select count(*) from transfers where client = $1 and reference = $2", client, reference
        ))
    finally:
        await conn.close()


async def test_a_replayed_transfer_answers_the_same_and_moves_money_once(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 500)
    key = new_key()
    first = await api.transfer(a, b, 120, key=key, reference="replay-1")
    assert first.status_code == 201, first.text
    assert REPLAYED.lower() not in first.headers, "expected the first answer not to be marked as a replay"
    second = await api.transfer(a, b, 120, key=key, reference="replay-1")
    assert second.status_code == 201, second.text
    assert second.headers.get(REPLAYED) == "true", f"expected {REPLAYED}: true, got {dict(second.headers)}"
    assert second.json() == first.json(), "expected the replay to carry the identical body"
    assert second.headers.get("location") == first.headers.get("location")
    assert (await api.balance(a), await api.balance(b)) == (380, 120), "expected the money moved once"
    assert await _transfer_rows(shard_dsn(shard), api.client_id, "replay-1") == 1, "expected one transfer row"


async def test_a_replayed_refusal_answers_the_same_refusal(api: ApiClient, topology: Topology) -> None:
    _, (a, b) = await accounts_in_one_shard(api, topology, 2)
    key = new_key()
    first = await api.transfer(a, b, 10, key=key)
    assert (first.status_code, first.json()["code"]) == (422, "insufficient_funds"), first.text
    await api.funded(a, 100)
    second = await api.transfer(a, b, 10, key=key)
    assert second.status_code == 422, "expected the stored refusal, not a new attempt after the deposit"
    assert second.headers.get(REPLAYED) == "true"
    first_body, second_body = first.json(), second.json()
    assert first_body.pop("request_id") != second_body.pop("request_id"), "expected each answer its own request id"
    assert first_body == second_body
    assert await api.balance(a) == 100


async def test_a_replayed_account_opening_returns_the_same_account(api: ApiClient) -> None:
    key = new_key()
    first = await api.open_account("GBP", key=key)
    second = await api.open_account("GBP", key=key)
    assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
    assert second.json() == first.json() and second.headers.get(REPLAYED) == "true"


async def test_the_same_key_with_another_body_is_idempotency_key_reused(api: ApiClient) -> None:
    account = await api.new_account()
    key = new_key()
    assert (await api.deposit(account, 100, key=key)).status_code == 201
    reused = await api.deposit(account, 101, key=key)
    assert (reused.status_code, reused.json()["code"]) == (422, "idempotency_key_reused"), reused.text
    other_route = await api.withdraw(account, 100, key=key)
    assert (other_route.status_code, other_route.json()["code"]) == (422, "idempotency_key_reused"), other_route.text
    assert await api.balance(account) == 100, "expected only the first deposit to take effect"


async def test_keys_are_scoped_to_the_client(api: ApiClient, other_api: ApiClient) -> None:
    key = new_key()
    mine, theirs = await api.new_account(), await other_api.new_account()
    assert (await api.deposit(mine, 5, key=key)).status_code == 201
    response = await other_api.deposit(theirs, 7, key=key)
    assert response.status_code == 201 and REPLAYED.lower() not in response.headers, response.text
    assert (await api.balance(mine), await other_api.balance(theirs)) == (5, 7)


async def test_a_post_without_a_key_is_idempotency_key_missing(api: ApiClient) -> None:
    account = await api.new_account()
    for path, body in [
        ("/v1/accounts", b'{"currency": "EUR"}'),
        ("/v1/deposits", f'{{"account": "{account}", "amount": 1, "currency": "EUR"}}'.encode()),
    ]:
        response = await api.post_raw(path, body, key=None)
        assert response.status_code == 400, f"expected 400 for {path} without a key, got {response.status_code}"
        assert response.json()["code"] == "idempotency_key_missing"
    bad = await api.post_raw("/v1/accounts", b'{"currency": "EUR"}', key="has space")
    assert (bad.status_code, bad.json()["code"]) == (400, "idempotency_key_invalid"), bad.text
    assert await api.balance(account) == 0


async def test_many_concurrent_copies_of_one_request_take_effect_once(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    key, copies = new_key(), 40
    responses = await asyncio.gather(
        *(api.deposit(account, 250, key=key, reference="storm") for _ in range(copies))
    )
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, f"expected only 201 (first or replay) and 409, got {statuses}"
    created = [r for r in responses if r.status_code == 201]
    originals = [r for r in created if r.headers.get(REPLAYED) != "true"]
    assert len(originals) == 1, f"expected exactly one original 201, got {len(originals)} of {statuses}"
    assert all(r.json() == originals[0].json() for r in created), "expected every replay to carry the same body"
    assert all(r.json()["code"] == "idempotency_key_in_flight" for r in responses if r.status_code == 409)
    assert await api.balance(account) == 250, "expected the deposit applied exactly once"
    dsn = shard_dsn(shard_of(topology, account))
    assert await _transfer_rows(dsn, api.client_id, "storm") == 1, "expected exactly one transfer row"
    after = await api.deposit(account, 250, key=key, reference="storm")
    assert after.status_code == 201 and after.headers.get(REPLAYED) == "true", "expected a replay once settled"
