"""Batches at a region (DESIGN D15): the use case behind `POST /v1/batches`, no HTTP types.

Atomic: every account of every item on one shard of this region; the items are posted by one call
(`txr_post_atomic`), all or none, and the batch's outcome is stored under its key. An item that is a transfer
to another shard would be a saga, which cannot be all-or-nothing with the rest: refused, `batch_spans_shards`.

Non-atomic: each item is exactly the single request it stands for, under its own (derived) key: the same
command (`RegionLedger.transfer`, `deposit`, `withdraw`), the same group commit, the same per-posting SQL and
rules, a saga for a transfer to another shard (201 when the fast path settles it in time, else 202 pending).
At most BATCH_ITEMS_IN_FLIGHT_MAX items are in flight at once. Each item's failure is its own answer (a status
and a code), never the batch's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app import limits
from app.api import batches
from app.api.schemas import BatchItem, BatchRequest, DepositItem, TransferItem, TransferRequest, WithdrawalItem
from app.errors import Problem
from app.ledger.postings import PostingKind
from app.region.service import RegionLedger
from app.store.shard import (
    AccountBusy,
    Outcome,
    QueueFull,
    ShardStore,
    ShardUnavailable,
    SlotMoved,
    TenantQueueFull,
)

log = logging.getLogger("txroute.region.batches")


def item_result(outcome: Outcome) -> dict[str, Any]:
    """One item's answer: its status and transfer, or its status and problem code."""
    if outcome.status < 400:
        result: dict[str, Any] = {"status": outcome.status, "transfer": outcome.body}
    else:
        result = {"status": outcome.status, "code": outcome.body["code"], "detail": outcome.body["detail"]}
    if outcome.replayed:
        result["replayed"] = True
    return result


def problem_result(code: str, detail: str) -> dict[str, Any]:
    return {"status": Problem(code).status, "code": code, "detail": detail}


async def post_batch(
    ledger: RegionLedger, client: str, key: str, batch: BatchRequest, granted: frozenset[str]
) -> Outcome:
    """The batch's outcome (an atomic batch's refusal is a problem body, as any posting's). Refusals made
    before anything is posted raise `Problem`."""
    indexes = batches.check(key, batch, granted)
    if batch.atomic:
        return await _atomic(ledger, client, key, batch, indexes)
    results = await _each(ledger, client, key, batch, indexes)
    replayed = all(r.get("replayed", False) for r in results)
    return Outcome(200, {"atomic": False, "items": results}, replayed=replayed)


async def _atomic(ledger: RegionLedger, client: str, key: str, batch: BatchRequest, indexes: list[int]) -> Outcome:
    postings = []
    stores: set[str] = set()
    store: ShardStore | None = None
    for index, item in zip(indexes, batch.items, strict=True):
        try:
            store, posting = await _posting(ledger, client, batches.item_key(key, index, item), item)
        except Problem as problem:
            raise Problem(problem.code, f"item {index}: {problem.detail}", extra={**problem.extra, "index": index},
                          headers=problem.headers) from None
        stores.add(store.name)
        if posting.saga is not None or len(stores) > 1:
            raise Problem("batch_spans_shards",
                          f"item {index} names an account on another shard; an atomic batch keeps to one shard",
                          extra={"index": index})
        postings.append(posting)
    assert store is not None
    return await store.post_atomic(client, key, batches.batch_fingerprint(batch), postings)


async def _posting(ledger: RegionLedger, client: str, key: str, item: BatchItem) -> tuple[ShardStore, Any]:
    request = batches.single_request(item)
    if isinstance(request, TransferRequest):
        return await ledger.transfer_posting(client, key, request)
    kind = PostingKind.DEPOSIT if isinstance(item, DepositItem) else PostingKind.WITHDRAWAL
    return await ledger.funds_posting(kind, client, key, request)


async def _each(
    ledger: RegionLedger, client: str, key: str, batch: BatchRequest, indexes: list[int]
) -> list[dict[str, Any]]:
    room = asyncio.Semaphore(limits.BATCH_ITEMS_IN_FLIGHT_MAX)

    async def one(index: int, item: BatchItem) -> dict[str, Any]:
        async with room:
            return await _one(ledger, client, batches.item_key(key, index, item), item)

    return list(await asyncio.gather(*(one(i, item) for i, item in zip(indexes, batch.items, strict=True))))


async def _one(ledger: RegionLedger, client: str, key: str, item: BatchItem) -> dict[str, Any]:
    """One item of a non-atomic batch, answered as its single request would be."""
    request = batches.single_request(item)
    try:
        if isinstance(item, TransferItem):
            assert isinstance(request, TransferRequest)
            outcome = await ledger.transfer(client, key, request)
        elif isinstance(item, WithdrawalItem):
            outcome = await ledger.withdraw(client, key, request)  # type: ignore[arg-type]
        else:
            outcome = await ledger.deposit(client, key, request)  # type: ignore[arg-type]
    except Problem as problem:
        result = {"status": problem.status, "code": problem.code, "detail": problem.detail}
        if problem.code == "misdirected":
            result["owner_region"] = problem.extra.get("owner_region")
        return result
    except ShardUnavailable:
        return problem_result("shard_unavailable", "the account's database did not answer; retry the batch")
    except SlotMoved:
        return problem_result("slot_moving", "an account of this item has just moved to another shard; nothing was "
                                             "posted; retry the batch")
    except AccountBusy:
        return problem_result("account_busy", "an account of this item is locked by another operation; nothing "
                                              "was posted; retry the batch")
    except TenantQueueFull:
        return problem_result("rate_limited", "this client has too many postings waiting on the shard; retry the "
                                              "batch")
    except QueueFull:
        return problem_result("overloaded", "too many requests queued; retry the batch")
    except Exception as exc:  # a bug in one item: it alone fails, its error logged by type only
        log.error("batch_item_error", extra={"error_type": type(exc).__name__})
        return problem_result("internal_error", "internal error")
    return item_result(outcome)
