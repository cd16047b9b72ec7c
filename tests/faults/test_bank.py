"""A bank workload in the style of Jepsen's: concurrent clients move money between accounts in every region
while others read balances, and a region's process is killed and restarted during the run.

The checker then verifies that no balance was ever seen below its limit, that the total is conserved once
quiet, that every acknowledged transfer is present exactly once (each account's final balance is exactly its
initial balance plus what the acknowledged transfers moved), and that `txroute audit` is clean.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from tests.helpers import ApiClient, new_client_id, new_key, poll_until

REGIONS = ("eu-north-1", "eu-west-1", "us-east-1")
ACCOUNTS_PER_REGION = 3
INITIAL_BALANCE = 5_000
WRITERS = 12
READERS = 3
RUN_S = 8.0  # the run lasts at least this long, so the kill and the restart fall inside it
# ...and, on a slow or busy machine, goes on until the workload is real (at most RUN_S_MAX): the checks below
# count acknowledgements and reads, never time.
ACKS_MIN = 60
READS_MIN = 60
RUN_S_MAX = 120.0
KILL_AT_S = 2.5
DOWN_FOR_S = 2.0  # the fault's duration, not a wait for a condition
RETRY_FOR_S = 60.0  # a client retries an unanswered write with its key for at most this long
RETRY_INTERVAL_S = 0.2


@dataclass
class History:
    acknowledged: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> (debit, credit, amount)
    refused: int = 0
    reads: int = 0
    below_limit: list[tuple[str, int]] = field(default_factory=list)


async def test_bank_workload_with_a_region_killed_conserves_money_and_acknowledged_transfers(make_world):
    world = make_world()
    client = new_client_id("bank")
    https = {r: httpx.AsyncClient(base_url=world.services[r].url, timeout=10, verify=world.services[r].verify)
             for r in REGIONS}
    apis = {r: ApiClient(https[r], client) for r in REGIONS}
    try:
        home: dict[str, str] = {}
        for region in REGIONS:
            for _ in range(ACCOUNTS_PER_REGION):
                account = await apis[region].new_account()
                await apis[region].funded(account, INITIAL_BALANCE)
                home[account] = region
        accounts = sorted(home)
        history = History()
        started = time.monotonic()

        def running() -> bool:
            elapsed = time.monotonic() - started
            if elapsed < RUN_S:
                return True
            real = len(history.acknowledged) >= ACKS_MIN and history.reads >= READS_MIN
            return not real and elapsed < RUN_S_MAX

        async def write_until_known(debit: str, credit: str, amount: int) -> None:
            key = new_key()
            give_up = time.monotonic() + RETRY_FOR_S
            while True:
                try:
                    response = await apis[home[debit]].transfer(debit, credit, amount, key=key)
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code in (201, 202):
                    history.acknowledged[response.json()["id"]] = (debit, credit, amount)
                    return
                if response is not None and response.status_code == 422:
                    assert response.json()["code"] == "insufficient_funds", response.text
                    history.refused += 1
                    return
                assert response is None or response.status_code == 503, f"unexpected answer: {response.text}"
                assert time.monotonic() < give_up, f"a write stayed unanswered for {RETRY_FOR_S}s"
                await asyncio.sleep(RETRY_INTERVAL_S)

        async def writer(seed: int) -> None:
            rng = random.Random(seed)
            while running():
                debit, credit = rng.sample(accounts, 2)
                await write_until_known(debit, credit, rng.randint(1, 300))

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            while running():
                account = rng.choice(accounts)
                try:
                    response = await apis[home[account]].account(account)
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    history.reads += 1
                    if response.json()["balance"] < 0:
                        history.below_limit.append((account, response.json()["balance"]))
                await asyncio.sleep(0.01)

        async def nemesis() -> None:
            await asyncio.sleep(KILL_AT_S)
            world.services["eu-north-1"].kill()
            await asyncio.sleep(DOWN_FOR_S)
            await asyncio.to_thread(world.restart, "eu-north-1")

        await asyncio.gather(
            *(writer(i) for i in range(WRITERS)), *(reader(100 + i) for i in range(READERS)), nemesis()
        )

        async def quiet() -> bool:
            for transfer_id, (debit, _, _) in history.acknowledged.items():
                state = (await apis[home[debit]].get(f"/v1/transfers/{transfer_id}")).json()["state"]
                if state == "pending":
                    return False
            return True

        await poll_until(quiet, timeout_s=60, what="every acknowledged transfer terminal")
        expected = {account: INITIAL_BALANCE for account in accounts}
        for transfer_id, (debit, credit, amount) in history.acknowledged.items():
            shown = (await apis[home[debit]].get(f"/v1/transfers/{transfer_id}")).json()
            assert shown["state"] == "posted", f"expected {transfer_id} posted (same client, currency), got {shown}"
            expected[debit] -= amount
            expected[credit] += amount
        actual = {account: await apis[home[account]].balance(account) for account in accounts}
    finally:
        for http in https.values():
            await http.aclose()

    assert len(history.acknowledged) >= ACKS_MIN, f"expected a real workload, only {len(history.acknowledged)} acks"
    assert history.reads >= READS_MIN, f"expected concurrent reads, only {history.reads}"
    assert not history.below_limit, f"expected no balance ever below its limit, saw {history.below_limit}"
    assert sum(actual.values()) == INITIAL_BALANCE * len(accounts), f"expected the total conserved: {actual}"
    assert actual == expected, (
        "expected every acknowledged transfer applied exactly once and nothing else: "
        f"{ {a: (actual[a], expected[a]) for a in accounts if actual[a] != expected[a]} }"
    )
    report = await world.audit()
    assert report.clean, report.text()
