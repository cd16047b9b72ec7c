"""Batches (DESIGN D15): what the router and the regions both need to know about a batch's items, and the
checks made before anything is sent or posted (so a batch a region would refuse is refused at the router).

An item's key is its own `idempotency_key`, or one derived from the batch's key and the item's index in the
client's batch: `<batch key> #<index>`. A client's key cannot contain a space, so a derived key never meets a
key a client chose. The derivation uses the index in the client's batch (never in the part a router sends to
one region), so a replay finds the same keys however the router splits it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.api.schemas import BatchItem, BatchRequest, FundsRequest, TransferItem, TransferRequest
from app.errors import Problem
from app.ledger.postings import fingerprint
from app.security import scopes


def batch_fingerprint(batch: BatchRequest) -> str:
    """The client's whole batch (items, their order, the atomic flag): what its key is bound to, by the router's
    claim (migration 0040) and by an atomic batch's stored record alike."""
    return fingerprint("batch", msgspec.to_builtins(batch))


def item_key(batch_key: str, index: int, item: BatchItem) -> str:
    return item.idempotency_key if item.idempotency_key is not None else f"{batch_key} #{index}"


def home_account(item: BatchItem) -> str:
    """The account whose shard posts the item: the debited one, or the credited one of a deposit."""
    if isinstance(item, TransferItem):
        return item.debit_account
    return item.account


def accounts(item: BatchItem) -> tuple[str, ...]:
    if isinstance(item, TransferItem):
        return (item.debit_account, item.credit_account)
    return (item.account,)


def single_request(item: BatchItem) -> TransferRequest | FundsRequest:
    """The item as the single request it stands for (same fields, hence the same idempotency fingerprint)."""
    target: type[Any] = TransferRequest if isinstance(item, TransferItem) else FundsRequest
    return target(**{name: getattr(item, name) for name in target.__struct_fields__})  # type: ignore[no-any-return]


def check(batch_key: str, batch: BatchRequest, granted: frozenset[str] | set[str]) -> list[int]:
    """Refuse what no region could post (duplicate keys or unique references, missing scope) and return each
    item's index in the client's batch."""
    indexes = list(range(len(batch.items))) if batch.indexes is None else batch.indexes
    if len(indexes) != len(batch.items) or len(set(indexes)) != len(indexes):
        raise Problem("invalid_request", "indexes must name each item once")
    if scopes.FUNDS_WRITE not in granted and any(not isinstance(i, TransferItem) for i in batch.items):
        raise Problem("forbidden", f"the token does not grant {scopes.FUNDS_WRITE} (the batch has deposits or "
                                   "withdrawals)")
    keys: dict[str, int] = {batch_key: -1}
    references: dict[tuple[str, str], int] = {}
    for index, item in zip(indexes, batch.items, strict=True):
        key = item_key(batch_key, index, item)
        if key in keys:
            other = "the batch itself" if keys[key] < 0 else f"item {keys[key]}"
            raise Problem("batch_duplicate_item_key", f"item {index} has the same Idempotency-Key as {other}",
                          extra={"index": index})
        keys[key] = index
        if item.unique_reference:
            if item.reference is None:
                raise Problem("invalid_request", f"item {index}: unique_reference needs a reference")
            scope = (home_account(item), item.reference)
            if scope in references:
                raise Problem(
                    "batch_duplicate_reference",
                    f"items {references[scope]} and {index} declare the unique reference {item.reference!r} for "
                    f"account {scope[0]}",
                    extra={"index": index},
                )
            references[scope] = index
    return indexes
