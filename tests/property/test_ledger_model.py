"""A random sequence of deposits, withdrawals and transfers over a few accounts of one shard, checked step
by step against a plain in-memory model: each outcome (posted or refused for funds) and each balance agree,
the entries agree with the balances, and the shard conserves money."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.topology.model import Topology
from tests.helpers import ApiClient, account_in_shard, accounts_in_one_shard, assert_shard_conserved, new_client_id

ACCOUNTS = 3
OVERDRAFT = {0: 0, 1: 0, 2: 200}  # account index -> overdraft limit


@dataclass(frozen=True)
class Op:
    kind: str  # deposit, withdrawal, transfer
    account: int
    other: int
    amount: int


amounts = st.one_of(st.integers(1, 400), st.sampled_from([1, 2**53 - 1]))
ops = st.builds(
    Op,
    kind=st.sampled_from(["deposit", "withdrawal", "transfer"]),
    account=st.integers(0, ACCOUNTS - 1),
    other=st.integers(1, ACCOUNTS - 1),
    amount=amounts,
)


def model_step(balances: list[int], op: Op) -> str:
    """Apply `op` to the model; return the code the ledger must answer (`posted` or a refusal)."""
    if op.kind == "deposit":
        if balances[op.account] + op.amount > 2**53 - 1:
            return "balance_limit_exceeded"
        balances[op.account] += op.amount
        return "posted"
    if balances[op.account] - op.amount < -OVERDRAFT[op.account]:
        return "insufficient_funds"
    if op.kind == "withdrawal":
        balances[op.account] -= op.amount
        return "posted"
    credit = (op.account + op.other) % ACCOUNTS
    if balances[credit] + op.amount > 2**53 - 1:
        return "balance_limit_exceeded"
    balances[op.account] -= op.amount
    balances[credit] += op.amount
    return "posted"


async def send(api: ApiClient, accounts: list[str], op: Op) -> httpx.Response:
    account = accounts[op.account]
    if op.kind == "deposit":
        return await api.deposit(account, op.amount)
    if op.kind == "withdrawal":
        return await api.withdraw(account, op.amount)
    return await api.transfer(account, accounts[(op.account + op.other) % ACCOUNTS], op.amount)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(ops, min_size=1, max_size=20))
async def test_random_postings_agree_with_an_in_memory_model(
    http: httpx.AsyncClient, topology: Topology, shard_dsn: Callable[[str], str], sequence: list[Op]
) -> None:
    api = ApiClient(http, new_client_id("prop"))  # a fresh client per example: examples never interfere
    shard, accounts = await accounts_in_one_shard(api, topology, ACCOUNTS - 1)
    accounts.append(await account_in_shard(api, topology, shard, overdraft_limit=OVERDRAFT[ACCOUNTS - 1]))
    model = [0] * ACCOUNTS
    posted = [0] * ACCOUNTS  # entries each account should have
    for step, op in enumerate(sequence):
        expected = model_step(model, op)
        response = await send(api, accounts, op)
        got = "posted" if response.status_code == 201 else response.json().get("code")
        assert got == expected, f"step {step} {op}: expected {expected}, got {response.status_code} {response.text}"
        if expected == "posted":
            posted[op.account] += 1
            if op.kind == "transfer":
                posted[(op.account + op.other) % ACCOUNTS] += 1
        touched = {op.account, (op.account + op.other) % ACCOUNTS}
        for i in touched:
            assert await api.balance(accounts[i]) == model[i], f"step {step} {op}: expected account {i} at {model[i]}"
    for i, account in enumerate(accounts):
        entries = await api.all_entries(account)
        assert len(entries) == posted[i], f"expected {posted[i]} entries for account {i}, got {len(entries)}"
        assert sum(e["amount"] for e in entries) == model[i], f"expected account {i}'s entries to sum to {model[i]}"
        assert await api.balance(account) == model[i]
    await assert_shard_conserved(shard_dsn(shard))
