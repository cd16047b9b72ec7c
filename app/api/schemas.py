"""The public API's bodies, shared by the router and the regional service (one OpenAPI surface).

Request bodies are decoded strictly with msgspec (`app.api.decoding`): an amount of `"100"`, `100.0` or
`true` is refused, not coerced, and unknown fields are refused.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

from app import limits
from app.ledger.money import CURRENCIES
from app.topology.ids import ACCOUNT_ID_PATTERN, TRANSFER_ID_PATTERN
from app.topology.model import SLOT_COUNT

Currency = enum.StrEnum("Currency", {code: code for code in sorted(CURRENCIES)})  # type: ignore[misc]

AccountId = Annotated[str, msgspec.Meta(pattern=ACCOUNT_ID_PATTERN, examples=["acc_2a901JDQ2ZJ4M7Q0VKDA9X6QH3N5A"])]
TransferId = Annotated[str, msgspec.Meta(pattern=TRANSFER_ID_PATTERN)]
AmountMinor = Annotated[
    int,
    msgspec.Meta(ge=1, le=limits.AMOUNT_MINOR_MAX, description="Integer count of the currency's minor unit."),
]
OverdraftMinor = Annotated[int, msgspec.Meta(ge=0, le=limits.OVERDRAFT_LIMIT_MINOR_MAX)]
# Text stored in PostgreSQL (text and jsonb) cannot hold a NUL character: refused here, never a 500 there.
NO_NUL_PATTERN = "^[^\x00]*$"
Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.REFERENCE_CHARS_MAX, pattern=NO_NUL_PATTERN)]
RegionName = Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$", max_length=32)]
MetadataKey = Annotated[
    str, msgspec.Meta(min_length=1, max_length=limits.METADATA_KEY_CHARS_MAX, pattern=NO_NUL_PATTERN)
]
MetadataValue = Annotated[str, msgspec.Meta(max_length=limits.METADATA_VALUE_CHARS_MAX, pattern=NO_NUL_PATTERN)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(
        max_length=limits.METADATA_KEYS_MAX,
        description=f"Up to {limits.METADATA_KEYS_MAX} string labels of the client's own, returned on reads.",
    ),
]


class HoldRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Reserve the amount instead of moving it (DESIGN D14): captured, voided or expired later, at most once."""

    expires_in_s: Annotated[int, msgspec.Meta(ge=1, le=limits.HOLD_EXPIRES_IN_S_MAX)]


class OpenAccountRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    currency: Currency
    region: RegionName | None = None
    overdraft_limit: OverdraftMinor = 0
    metadata: Metadata | None = None


class FundsRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A deposit or a withdrawal: money in or out through the shard's settlement account."""

    account: AccountId
    amount: AmountMinor
    currency: Currency
    reference: Reference | None = None
    metadata: Metadata | None = None
    hold: HoldRequest | None = None  # withdrawals only
    # The reference may be used by no other transfer of this client on this account (409 reference_in_use).
    unique_reference: bool = False


class TransferRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    debit_account: AccountId
    credit_account: AccountId
    amount: AmountMinor
    currency: Currency
    reference: Reference | None = None
    metadata: Metadata | None = None
    hold: HoldRequest | None = None
    # The reference may be used by no other transfer of this client debiting this account (409 reference_in_use).
    unique_reference: bool = False


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/transfers/{id}/capture`: the body is optional; without `amount` the whole hold is captured."""

    amount: AmountMinor | None = None


# Batch items (DESIGN D15) take exactly the fields of the single request (they inherit them), plus the item's
# own optional Idempotency-Key; without one an item's key is derived from the batch's key and its index.
ItemKey = Annotated[
    str, msgspec.Meta(pattern=r"^[\x21-\x7e]+$", min_length=1, max_length=limits.IDEMPOTENCY_KEY_CHARS_MAX)
]


class TransferItem(TransferRequest, tag_field="type", tag="transfer", forbid_unknown_fields=True, kw_only=True):
    idempotency_key: ItemKey | None = None


class DepositItem(FundsRequest, tag_field="type", tag="deposit", forbid_unknown_fields=True, kw_only=True):
    idempotency_key: ItemKey | None = None


class WithdrawalItem(FundsRequest, tag_field="type", tag="withdrawal", forbid_unknown_fields=True, kw_only=True):
    idempotency_key: ItemKey | None = None


BatchItem = TransferItem | DepositItem | WithdrawalItem


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/batches`. Atomic: one shard, every item posted or none. Non-atomic: any accounts, each item
    answered on its own, in order. `indexes` is set only by a router on the part of a batch it sends to one
    region: each item's index in the client's batch, from which its derived key is made."""

    atomic: bool
    items: Annotated[list[BatchItem], msgspec.Meta(min_length=1, max_length=limits.BATCH_ITEMS_MAX)]
    indexes: Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=limits.BATCH_ITEMS_MAX)]], msgspec.Meta(
        max_length=limits.BATCH_ITEMS_MAX)] | None = None


class BatchClaim(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /internal/batch-claim`, from a router only, before it sends a batch's items (DESIGN D15): bind the
    batch's Idempotency-Key to `fingerprint` (of the client's whole batch) at the key's home `slot`."""

    slot: Annotated[int, msgspec.Meta(ge=0, lt=SLOT_COUNT)]
    fingerprint: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class BatchItemResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One item's outcome: its status and transfer, or its status and problem code."""

    status: int
    transfer: Transfer | None = None
    code: str | None = None
    detail: str | None = None
    replayed: bool = False


class BatchResult(msgspec.Struct, kw_only=True):
    atomic: bool
    items: list[BatchItemResult]


class Account(msgspec.Struct, kw_only=True):
    id: AccountId
    currency: str
    balance: int
    held: int
    available: int
    overdraft_limit: int
    status: str
    region: str
    created_at: str
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    closed_at: str | None = None
    as_of: str | None = None


class Hold(msgspec.Struct, kw_only=True):
    amount: int
    expires_at: str


class Transfer(msgspec.Struct, kw_only=True):
    id: TransferId
    kind: str
    amount: int
    currency: str
    state: str
    created_at: str
    reference: str | None = None
    debit_account: str | None = None
    credit_account: str | None = None
    account: str | None = None
    reason: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    hold: Hold | None = None


class Entry(msgspec.Struct, kw_only=True):
    id: int
    transfer_id: str
    amount: int
    balance_after: int
    created_at: str


class EntriesPage(msgspec.Struct, kw_only=True):
    items: list[Entry]
    next_cursor: str | None


class TransfersPage(msgspec.Struct, kw_only=True):
    """An account's transfers, newest first; `next_cursor` is opaque (null on the last page). `complete_from`, only
    for an account that arrived on its shard by a slot move: the listing holds every transfer of the account made
    from then on, but a transfer into it made before then from an account that did not move with it is not listed
    (it stayed with the shard the account left)."""

    items: list[Transfer]
    next_cursor: str | None
    complete_from: str | None = None


class ReferenceLookup(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The client's transfers with a reference, newest first, from every region that answered; a region that
    did not is named in `unavailable_regions` (the list is then possibly incomplete)."""

    items: list[Transfer]
    unavailable_regions: list[str] = msgspec.field(default_factory=list)


class Health(msgspec.Struct, kw_only=True):
    """`GET /healthz`: the process is alive (it checks nothing else)."""

    status: Literal["ok"]


class RegionReadiness(msgspec.Struct, kw_only=True):
    """A region's `GET /readyz` (200 ready, 503 not): every shard of the region reachable and migrated."""

    status: Literal["ready", "not_ready"]
    shards: dict[str, bool] = msgspec.field(default_factory=dict)


class RouterReadiness(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The router's `GET /readyz`: 200 once its upstream clients are open (a region that is down does not
    make it unready: it still answers for the others), else 503 with the status alone."""

    status: Literal["ready", "not_ready"]
    # Each region's reachability (its /healthz), the shard map's version and the drained regions.
    regions: dict[str, bool] | None = None
    shardmap_version: int | None = None
    draining: list[str] | None = None


class ProblemDetails(msgspec.Struct, kw_only=True):
    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str


class SagaMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A saga's message from the debit shard to the credit shard (internal API, DESIGN D6)."""

    transfer_id: TransferId
    client: str
    debit_account: AccountId
    credit_account: AccountId
    credit_slot: Annotated[int, msgspec.Meta(ge=0, le=4095)]
    amount: AmountMinor
    currency: Currency
    reference: Reference | None = None
    source_shard: str
    destination_shard: str


class ReplayLookup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A region asks another (internal API, issue 11): which stored answer of (client, key) it holds at each of
    these slots, which moved there from the asking region. Answered per slot: the record, none, or where the
    slot moved on."""

    client: Annotated[str, msgspec.Meta(min_length=1, max_length=limits.CLIENT_ID_CHARS_MAX)]
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=limits.IDEMPOTENCY_KEY_CHARS_MAX)]
    slots: Annotated[
        list[Annotated[int, msgspec.Meta(ge=0, le=4095)]],
        msgspec.Meta(min_length=1, max_length=limits.OPEN_REPLAY_SLOTS_PER_CALL_MAX),
    ]


class SagaBatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Saga messages the relay delivers to one region in one call (internal API, issue 14): each gets its
    own result, in order."""

    messages: Annotated[
        list[SagaMessage], msgspec.Meta(min_length=1, max_length=limits.SAGA_RELAY_BATCH_MESSAGES_MAX)
    ]
