"""The router's hold for moving slots (app/router/hold.py) on its own: what ends a hold and what it answers.
The end-to-end behaviour with real regions is in tests/e2e/test_slot_moving_hold.py and test_move_under_router.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.api.upstreams import Answer
from app.errors import Problem, problem_body
from app.router.hold import SlotMovingHold, is_slot_moving
from app.router.shardmap import ShardMap, ShardMapCache
from app.topology.loader import load_topology

MOVING = Answer(503, [], problem_body("slot_moving", "frozen", "req_x"))
MISDIRECTED = Answer(421, [], problem_body("misdirected", "moved", "req_x"))
POSTED = Answer(201, [], b'{"id": "trf_1"}')


def cache() -> ShardMapCache:
    async def fetch(region: str) -> dict[str, Any]:
        return {"shards": []}

    return ShardMapCache(ShardMap.from_topology(load_topology()), ("eu-west-1",), fetch)


def scripted(*answers: Answer) -> tuple[list[int], Any]:
    calls: list[int] = []

    async def attempt() -> Answer:
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1]

    return calls, attempt


async def test_a_421_during_the_hold_keeps_it_going_until_an_owner_answers() -> None:
    calls, attempt = scripted(MOVING, MISDIRECTED, MOVING, POSTED)
    hold = SlotMovingHold(shardmap=cache(), hold_s=5.0, region="eu-west-1")
    assert await hold.hold(attempt) is POSTED
    assert len(calls) == 4 and hold.held == 0


async def test_past_the_hold_the_answer_is_503_slot_moving_with_retry_after() -> None:
    calls, attempt = scripted(MOVING)
    hold = SlotMovingHold(shardmap=cache(), hold_s=0.2, region="eu-west-1")
    with pytest.raises(Problem) as caught:
        await hold.hold(attempt)
    assert caught.value.code == "slot_moving" and caught.value.headers == {"retry-after": "1"}
    assert len(calls) >= 2, "expected the request sent again during the hold"
    assert hold.held == 0


async def test_a_map_refresh_wakes_a_held_request_before_its_backoff_ends() -> None:
    shardmap = cache()
    seen = shardmap.current.version
    waiter = asyncio.create_task(shardmap.wait_refreshed(seen, timeout_s=30.0))
    await asyncio.sleep(0)  # let it start waiting
    await shardmap.refresh(seen_version=seen)
    await asyncio.wait_for(waiter, 5.0)  # returns long before its 30 s timeout
    assert shardmap.current.version == seen + 1


def test_only_a_503_with_code_slot_moving_is_held() -> None:
    assert is_slot_moving(MOVING)
    assert not is_slot_moving(Answer(503, [], problem_body("region_draining", "drained", "req_x")))
    assert not is_slot_moving(MISDIRECTED)
