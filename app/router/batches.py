"""A non-atomic batch through the router (DESIGN D15): split by the region of each item's home account, the
parts sent concurrently, the answers merged in the client's order.

Each part is a request of the router's own making: its body is the region's items plus their indexes in the
client's batch (`indexes`), so the region derives each item's key from the batch's key and the item's index in
the client's batch, whatever the split (a replay after the shard map changed finds the same keys). Each part
carries its own hop token, bound to that part's body, and the batch's Idempotency-Key, which the region uses only
to derive item keys: each item's outcome is stored under its own key where it posts. What binds the batch's key
to the whole body is `claim_batch`, before any part is sent (for an atomic batch too). A region that cannot be
reached answers its items 503 with the code it would answer a single request (`region_unavailable`,
`region_draining`) while the other parts are answered as usual; an item answered 421
(its slot moved) is sent once more after the shard map is refreshed, and items answered 503 slot_moving (their
slot is frozen by a move) are held and sent again like a single request (app/router/hold.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from app import telemetry
from app.api.batches import batch_fingerprint
from app.api.schemas import BatchClaim, BatchItem, BatchRequest
from app.api.upstreams import Answer
from app.errors import Problem, slot_moving
from app.router.hold import is_slot_moving
from app.security.tokens import BoundRequest, Principal
from app.topology.placement import batch_home_slot

if TYPE_CHECKING:
    from app.router.app import Router

BATCHES_PATH = "/v1/batches"
CLAIM_PATH = "/internal/batch-claim"
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def claim_batch(
    router: Router, principal: Principal, key: str, batch: BatchRequest, client_headers: dict[str, str]
) -> Answer | None:
    """Bind the batch's key to its body before any item is sent (migration 0040): at the key's home slot (a
    hash of client and key, whatever accounts the batch names), so a body sent earlier under the key is met
    there even when the two share no region. None: claimed now or by this same body before (go on); else the
    answer for the whole batch, nothing sent (`422 idempotency_key_reused`, `409 idempotency_key_in_flight`,
    `503` when the home cannot be reached: retry with the same key). A home slot frozen by a move is held like
    a single request."""
    slot = batch_home_slot(principal.client, key)
    body = msgspec.json.encode(BatchClaim(slot=slot, fingerprint=batch_fingerprint(batch)))

    async def attempt() -> Answer:
        hop = router.minter.for_client(principal, BoundRequest("POST", CLAIM_PATH, body, key))
        headers = {**client_headers, "authorization": "Bearer " + hop, "idempotency-key": key,
                   "content-type": "application/json"}
        return await router.send_to_slot(slot, "POST", CLAIM_PATH, headers, body)

    answer = await attempt()
    if is_slot_moving(answer) or answer.status == 421:
        answer = await router.hold.hold(attempt)
    return None if answer.status == 200 else answer


async def post_split_batch(
    router: Router, principal: Principal, key: str, batch: BatchRequest, slots: list[list[int]],
    client_headers: dict[str, str],
) -> Answer:
    results: list[dict[str, Any] | None] = [None] * len(batch.items)

    async def send(indexes: list[int]) -> None:
        await asyncio.gather(*(
            _send_part(router, principal, key, region, part, batch.items, client_headers, results)
            for region, part in _by_region(router, indexes, slots).items()
        ))

    seen = router.shardmap.current.version
    await send(list(range(len(batch.items))))
    moved = [i for i, result in enumerate(results) if result is not None and result["status"] == 421]
    if moved:
        # Their slots moved (DESIGN D13): a 421 posted nothing, so sending them again is safe.
        telemetry.METRICS.misdirected.labels("router", router.region).inc()
        await router.shardmap.refresh(seen_version=seen)
        await send(moved)
    held = _moving(results, range(len(results)))
    if held:
        # Items whose slot is frozen by a move are held like a single request (app/router/hold.py), and only
        # they are sent again; past the hold they keep their 503 slot_moving answers.
        async def again() -> Answer:
            nonlocal held
            seen = router.shardmap.current.version
            await send(held)
            held = _moving(results, held)
            if any((result := results[i]) is not None and result["status"] == 421 for i in held):
                await router.shardmap.refresh(seen_version=seen)
            return _STILL_MOVING if held else _RELEASED

        try:
            await router.hold.hold(again)
        except Problem as problem:
            if problem.code != "slot_moving":
                raise
        # A 421 still there past the hold is a slot whose new owner does not claim it yet (a move's switch-in):
        # the client sees it as the frozen slot it still is, never the routers' internal 421.
        for i in held:
            result = results[i]
            if result is not None and result["status"] == 421:
                results[i] = _refused(slot_moving("this item's slot is moving to another shard; nothing was written"),
                                      slot=result.get("slot"))
    assert all(result is not None for result in results)
    body = {"atomic": False, "items": results}
    headers = list(_JSON_HEADERS)
    if all(result is not None and result.get("replayed") for result in results):
        headers.append((b"idempotent-replayed", b"true"))
    return Answer(200, headers, msgspec.json.encode(body))


# What a batch's held items answer the hold: still moving, or released.
_STILL_MOVING = Answer(503, [], b'{"code":"slot_moving"}')
_RELEASED = Answer(200, [], b"")


def _refused(problem: Problem, **extra: Any) -> dict[str, Any]:
    """An item's answer when the router refuses it: the problem's status, code and detail, and `extra`."""
    return {"status": problem.status, "code": problem.code, "detail": problem.detail, **extra}


def _moving(results: list[dict[str, Any] | None], indexes: Iterable[int]) -> list[int]:
    """The items answered 503 slot_moving or 421 (nothing written: safe to send again)."""
    return [i for i in indexes if (result := results[i]) is not None and (
        result["status"] == 421 or (result["status"] == 503 and result.get("code") == "slot_moving"))]


def _by_region(router: Router, indexes: list[int], slots: list[list[int]]) -> dict[str, list[int]]:
    parts: dict[str, list[int]] = {}
    for index in indexes:
        parts.setdefault(router.shardmap.region_for_slot(slots[index][0]), []).append(index)
    return parts


async def _send_part(
    router: Router, principal: Principal, key: str, region: str, indexes: list[int], items: list[BatchItem],
    client_headers: dict[str, str], results: list[dict[str, Any] | None],
) -> None:
    """Send one region its items and write each item's answer into `results` (never raises for the region)."""
    body = msgspec.json.encode(BatchRequest(atomic=False, items=[items[i] for i in indexes], indexes=indexes))
    hop = router.minter.for_client(principal, BoundRequest("POST", BATCHES_PATH, body, key))
    headers = {**client_headers, "authorization": "Bearer " + hop, "idempotency-key": key,
               "content-type": "application/json"}
    try:
        router.refuse_if_draining(region)
        answer = await router.send_to_region(region, "POST", BATCHES_PATH, headers, body)
    except Problem as problem:  # the region is down or drained: its items say so, the others are answered
        for index in indexes:
            results[index] = _refused(problem, region=region)
        return
    doc: Any = None
    try:
        doc = msgspec.json.decode(answer.body)
    except msgspec.DecodeError:
        pass
    if answer.status == 200 and isinstance(doc, dict) and len(doc.get("items", ())) == len(indexes):
        for index, result in zip(indexes, doc["items"], strict=True):
            results[index] = result
        return
    # The region refused the part as a whole (a problem it would answer each item alone too).
    code = doc.get("code", "internal_error") if isinstance(doc, dict) else "internal_error"
    detail = doc.get("detail", "the region's answer could not be read") if isinstance(doc, dict) else (
        "the region's answer could not be read")
    for index in indexes:
        results[index] = {"status": answer.status, "code": code, "detail": detail}
