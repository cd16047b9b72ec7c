"""Transfer states and the transitions between them.

The database enforces them for every writer (table `transfer_transitions` and the trigger
`transfers_check_transition` in the first migration); this enum mirrors that table for the code, and a test
checks the two agree, so they are one definition held twice like every other invariant.
"""

from __future__ import annotations

import enum


class TransferState(enum.StrEnum):
    PENDING = "pending"  # debited at the source, in transit to the credit shard (DESIGN D6)
    POSTED = "posted"  # both sides booked
    RETURNED = "returned"  # refused by the credit side; the money went back to the source
    HELD = "held"  # a hold (DESIGN D14): the amount is reserved on the debit account, nothing moved yet
    VOIDED = "voided"  # the hold was released by its client
    EXPIRED = "expired"  # the hold's time came before it was captured or voided

    @property
    def terminal(self) -> bool:
        return self not in (TransferState.PENDING, TransferState.HELD)


TRANSITIONS = frozenset(
    {
        (TransferState.PENDING, TransferState.POSTED),
        (TransferState.PENDING, TransferState.RETURNED),
        # A hold is resolved at most once: captured (posted, or pending when the credit is on another shard),
        # voided or expired.
        (TransferState.HELD, TransferState.POSTED),
        (TransferState.HELD, TransferState.PENDING),
        (TransferState.HELD, TransferState.VOIDED),
        (TransferState.HELD, TransferState.EXPIRED),
    }
)
