"""An atomic batch whose item meets a refusal that is never an idempotent answer (here 503
ledger_limit_reached: the shard's settlement account at its bound) is rolled back whole and answered with that
refusal, not stored: the same batch with the same key posts once the cause is gone."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from app import limits
from app.ledger.postings import settlement_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, assert_shard_conserved, new_key, shard_of

CURRENCY = "ZAR"  # a currency no other test deposits, so this test alone moves its settlement account


async def test_an_atomic_batch_refused_for_a_transient_cause_is_not_stored_and_its_retry_posts(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account(CURRENCY)
    shard = shard_of(topology, account)
    settlement = settlement_account_id(shard, CURRENCY)
    items = [{"type": "deposit", "account": account, "amount": 40, "currency": CURRENCY}] * 2
    body = {"atomic": True, "items": items}
    key = new_key()
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        # The settlement account is debited by deposits: put it 50 short of its bound (as an operator's repair
        # would, outside the journal), so the second deposit of the batch would cross it.
        before = await conn.fetchval("select balance from accounts where id = $1", settlement)
        await conn.execute("update accounts set balance = $2 where id = $1", settlement,
                           -limits.SYSTEM_ACCOUNT_BALANCE_ABS_MAX + 50)
        try:
            refused = await api.post("/v1/batches", body, key=key)
        finally:
            await conn.execute("update accounts set balance = $2 where id = $1", settlement, before)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "ledger_limit_reached" and refused.json()["index"] == 1, refused.text
        assert await api.balance(account) == 0, "expected the first item rolled back with the batch"
        posted = await api.post("/v1/batches", body, key=key)
        assert posted.status_code == 201 and posted.headers.get("idempotent-replayed") is None, posted.text
        assert await api.balance(account) == 80
    finally:
        await conn.close()
    await assert_shard_conserved(shard_dsn(shard))
