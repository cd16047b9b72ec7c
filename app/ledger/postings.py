"""What a write asks the ledger to do, as plain values (no HTTP, no SQL), and its idempotency fingerprint."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, fields

import msgspec

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
    metadata: dict[str, str] | None = None
    # A hold (DESIGN D14): reserve the amount on the debit account for this long instead of moving it.
    hold_expires_in_s: int | None = None
    # A hold whose credit account lives on another shard: checked when the capture's saga applies it.
    credit_remote: bool = False
    # The reference may be used by no other transfer of the client on its customer account (migration 0010).
    unique_reference: bool = False

    def __post_init__(self) -> None:
        assert money.is_amount(self.amount), self.amount
        assert money.is_currency(self.currency), self.currency
        assert self.debit != self.credit
        assert self.saga is None or self.kind is PostingKind.TRANSFER
        if self.hold_expires_in_s is not None:
            assert self.saga is None and self.kind is not PostingKind.DEPOSIT, "a hold never starts a saga"
        assert not self.credit_remote or self.hold_expires_in_s is not None, "only a hold names a remote credit"
        assert not self.unique_reference or self.reference is not None

    def as_json(self) -> dict[str, object]:
        """The posting as `txr_post` reads it (the saga leg's fields flattened in). Built field by field:
        `dataclasses.asdict` costs 15x more, on every posting."""
        doc: dict[str, object] = {name: getattr(self, name) for name in _POSTING_FIELDS}
        if self.saga is not None:
            doc.update({name: getattr(self.saga, name) for name in _SAGA_FIELDS})
        return doc


_POSTING_FIELDS = tuple(f.name for f in fields(Posting) if f.name != "saga")
_SAGA_FIELDS = tuple(f.name for f in fields(SagaLeg))
_canonical = msgspec.json.Encoder(order="sorted")


def fingerprint(operation: str, body: dict[str, object]) -> str:
    """A digest of what the request asks for, so a key reused for another request is detected (D5)."""
    return hashlib.sha256(_canonical.encode({"op": operation, "body": body})).hexdigest()
