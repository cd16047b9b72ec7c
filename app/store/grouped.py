"""Group commit for the saga's single messages at their credit shard (DESIGN D6, D11; issue 14).

The fast path applies one message at its credit shard, a transaction of its own. Every cross-shard transfer
between two shards books the same transit account there (`trn_<shard>_<other shard>_<currency>`): concurrent
applies wait for that row's lock one after the other, each holding it through its commit's WAL flush.
Measured at 8 clients, RTT 40 ms: an apply took ~16-19 ms at the credit shard against ~4 ms for a client
alone, most of it waiting on the transit row (`Lock transactionid`) and on the WAL flush (`WALSync`).

`Grouped` sends what concurrent callers hand it together: one task per shard takes every item waiting (at
most `batch_max`) and makes one call, so one transaction, one lock of the transit row and one WAL flush serve
them all; callers that come while it runs form the next call. A caller alone is sent at once, through the
one-item call (the same SQL as before, no extra wait). Each caller gets its own item's result or error
(`isolated`: an item that fails its batch's transaction is found by halving, the others are kept).

The settle at the debit shard is not grouped: settles share no row (an `applied` answer locks only its own
transfer), so they already run side by side, and grouped they cost the debit shard's database more CPU per
transfer (~8.9 against ~8.2 ms per cross-region transfer in all, A/B at 8 clients) and waited longer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from opentelemetry.trace import SpanContext

from app import telemetry

log = logging.getLogger("txroute.store")

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class GroupFull(Exception):
    """More items wait for one grouped call than its bound; nothing was sent."""


async def isolated(
    call: Callable[[list[_Item]], Awaitable[list[_Result]]],
    items: list[_Item],
    *,
    split_on: tuple[type[Exception], ...],
) -> list[_Result | Exception]:
    """`call` on all items in one transaction; when it fails with an error of `split_on` (a database error of
    the transaction), on each half again, so an item that fails alone gets its error and the others their
    results (a bug in one message never holds up its batch). Any other error (a lost database) is the whole
    batch's and is raised."""
    try:
        return list(await call(items))
    except split_on as exc:
        if len(items) == 1:
            return [exc]
        log.error("saga_batch_failed_splitting", extra={"batch_size": len(items),
                                                        "sqlstate": getattr(exc, "sqlstate", None)})
    half = len(items) // 2
    return [*await isolated(call, items[:half], split_on=split_on),
            *await isolated(call, items[half:], split_on=split_on)]


class Grouped(Generic[_Item, _Result]):
    """Concurrent one-item calls made as few calls: `one(item)` for an item alone, else `many(items)` (which
    returns per item its result or its error, in order). At most `waiting_max` items wait (then GroupFull).
    Both get `parent` and `links` for their database span: the call belongs to the first caller's trace and
    is linked from the others' (as group commit's postings are)."""

    def __init__(
        self,
        name: str,
        one: Callable[..., Awaitable[_Result]],
        many: Callable[..., Awaitable[list[_Result | Exception]]],
        *,
        batch_max: int,
        waiting_max: int,
    ) -> None:
        assert 1 <= batch_max <= waiting_max
        self._name = name
        self._one = one
        self._many = many
        self._batch_max = batch_max
        self._waiting_max = waiting_max
        self._waiting: list[tuple[_Item, asyncio.Future[_Result], SpanContext | None]] = []
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, item: _Item) -> _Result:
        """The item's result once its call is done. A caller that stops waiting (a timeout) leaves its item
        to be sent all the same: every call this serves is idempotent."""
        if len(self._waiting) >= self._waiting_max:
            raise GroupFull(f"{self._name}: {self._waiting_max} items waiting")
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._waiting.append((item, future, telemetry.current_span_context()))
        if self._worker is None:
            # A context of its own: the worker serves every caller, and inherits no caller's current span.
            self._worker = asyncio.create_task(self._drain(), name=self._name, context=contextvars.Context())
        return await asyncio.shield(future)

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        for _, future, _ in self._waiting:
            future.cancel()
        self._waiting.clear()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._batch_max]
                del self._waiting[: self._batch_max]
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug here: its callers get it, and the worker serves the next ones
                    log.error("grouped_call_failed", extra={"call": self._name, "error_type": type(exc).__name__})
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
        finally:
            if self._worker is asyncio.current_task():
                self._worker = None

    async def _send(self, batch: list[tuple[_Item, asyncio.Future[_Result], SpanContext | None]]) -> None:
        spans = [span for _, _, span in batch if span is not None]
        span: dict[str, Any] = {"parent": spans[0] if spans else None, "links": spans[1:]}
        results: list[_Result | Exception]
        try:
            if len(batch) == 1:
                try:
                    results = [await self._one(batch[0][0], **span)]
                except Exception as exc:  # the caller's own error
                    results = [exc]
            else:
                results = await self._many([item for item, _, _ in batch], **span)
        except Exception as exc:  # the whole call's (a lost database): every caller's
            results = [exc] * len(batch)
        except BaseException:  # cancelled (the store closes): nobody gets an answer
            for _, future, _ in batch:
                future.cancel()
            raise
        assert len(results) == len(batch), (len(results), len(batch))
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _retrieve(future: asyncio.Future[_Result]) -> None:
    """A caller that stopped waiting never reads its error: read here, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()
