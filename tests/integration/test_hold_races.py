"""A hold is resolved at most once (DESIGN D14) when captures, voids and its expiry race on it: many requests
(each its own key, as many clients would send them) fired at holds right around their expiry, with the sweeper
run at the same time. Exactly one of capture, void or expiry wins each hold, and the money says which."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Callable

import asyncpg

from app.topology.model import Topology
from tests.helpers import ApiClient, accounts_in_one_shard, assert_shard_conserved, poll_until

HOLDS = 6
REQUESTS_PER_KIND = 4  # captures and as many voids per hold
AMOUNT = 10


async def test_capture_void_and_expiry_racing_on_a_hold_resolve_it_exactly_once(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    dsn = shard_dsn(shard)
    await api.funded(a, HOLDS * AMOUNT)
    holds = []
    for _ in range(HOLDS):
        response = await api.hold(a, b, AMOUNT, expires_in_s=1)
        assert response.status_code == 201, response.text
        holds.append(response.json())
    last_expiry = max(dt.datetime.fromisoformat(h["hold"]["expires_at"]) for h in holds)
    conn = await asyncpg.connect(dsn)
    try:
        # Fire once the first hold is within a few milliseconds of its time, so some requests land before
        # it and some after, while the sweeper runs on the same holds.
        first_expiry = min(dt.datetime.fromisoformat(h["hold"]["expires_at"]) for h in holds)

        async def near() -> bool:
            now: dt.datetime = await conn.fetchval("select clock_timestamp()")
            return now >= first_expiry - dt.timedelta(milliseconds=30)

        await poll_until(near, timeout_s=5, what="the holds' expiry to come near")

        async def sweep() -> int:
            sweeper = await asyncpg.connect(dsn)
            try:
                total = 0
                for _ in range(20):
                    total += int(await sweeper.fetchval("select txr_holds_expire(100)"))
                return total
            finally:
                await sweeper.close()

        requests = [
            call
            for hold in holds
            for call in (
                *(api.capture(hold["id"]) for _ in range(REQUESTS_PER_KIND)),
                *(api.void(hold["id"]) for _ in range(REQUESTS_PER_KIND)),
            )
        ]
        results = await asyncio.gather(sweep(), *requests)
        responses = results[1:]

        async def all_past() -> bool:
            now: dt.datetime = await conn.fetchval("select clock_timestamp()")
            return now > last_expiry

        await poll_until(all_past, timeout_s=5, what="every hold's time to pass")
        await conn.fetchval("select txr_holds_expire(100)")
        states = {r["id"]: r["state"] for r in await conn.fetch(
            "select id, state from transfers where id = any($1::text[])", [h["id"] for h in holds])}
        resolutions = await conn.fetch(
            """select transfer_id, count(*) as n from transfer_events
               where transfer_id = any($1::text[]) and seq > 1 group by transfer_id""", [h["id"] for h in holds])
    finally:
        await conn.close()

    per_hold = 2 * REQUESTS_PER_KIND
    captured = 0
    for i, hold in enumerate(holds):
        mine = responses[i * per_hold:(i + 1) * per_hold]
        won = [r for r in mine if r.status_code in (200, 201)]
        lost = Counter(r.json().get("code") for r in mine if r.status_code not in (200, 201))
        assert set(lost) <= {"transfer_not_held"}, f"expected losers refused transfer_not_held, got {lost}"
        assert len(won) <= 1, f"expected at most one winning request for {hold['id']}, got {len(won)}"
        state = states[hold["id"]]
        if won:
            assert state == won[0].json()["state"] and state in ("posted", "voided"), (state, won[0].text)
        else:
            assert state == "expired", f"expected {hold['id']} expired when no request won, got {state}"
        captured += AMOUNT if state == "posted" else 0
    assert {r["transfer_id"]: r["n"] for r in resolutions} == {h["id"]: 1 for h in holds}, (
        "expected exactly one resolution recorded per hold"
    )
    assert await api.balance(a) == HOLDS * AMOUNT - captured
    assert await api.balance(b) == captured
    assert (await api.account(a)).json()["held"] == 0
    await assert_shard_conserved(dsn)
