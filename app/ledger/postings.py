"""What a write asks the ledger to do, as plain values (no HTTP, no SQL), and its idempotency fingerprint."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass

from app.ledger import money


class PostingKind(enum.StrEnum):
    TRANSFER = "transfer"
    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"


def settlement_account_id(shard: str, currency: str) -> str:
    """The per-shard, per-currency account that money enters and leaves the ledger through."""
    return f"set_{shard}_{currency}"


def transit_account_id(shard: str, peer_shard: str, currency: str) -> str:
    """The account in `shard` holding what is in transit between it and `peer_shard` (DESIGN D6)."""
    return f"trn_{shard}_{peer_shard}_{currency}"


@dataclass(frozen=True, slots=True)
class SagaLeg:
    """Where the credit side of a cross-shard transfer lives, and the transit account that carries it."""

    transit: str
    credit_shard: str
    credit_region: str
    credit_slot: int
    # When the relay first looks at the message: the fast path has this long to deliver it itself.
    relay_delay_ms: int


@dataclass(frozen=True, slots=True)
class Posting:
    """One balanced movement of `amount` from `debit` to `credit`, both in this shard."""

    kind: PostingKind
    id: str
    slot: int  # the routing slot: the shard must own it (DESIGN D2)
    client: str
    key: str
    fingerprint: str
    debit: str
    credit: str
    amount: int
    currency: str
    reference: str | None
    saga: SagaLeg | None = None

    def __post_init__(self) -> None:
        assert money.is_amount(self.amount), self.amount
        assert money.is_currency(self.currency), self.currency
        assert self.debit != self.credit
        assert self.saga is None or self.kind is PostingKind.TRANSFER

    def as_json(self) -> dict[str, object]:
        """The posting as `txr_post` reads it (the saga leg's fields flattened in)."""
        doc = asdict(self)
        saga = doc.pop("saga")
        if saga is not None:
            doc.update(saga)
        return doc


def fingerprint(operation: str, body: dict[str, object]) -> str:
    """A digest of what the request asks for, so a key reused for another request is detected (D5)."""
    canonical = json.dumps({"op": operation, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
