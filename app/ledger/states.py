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

    @property
    def terminal(self) -> bool:
        return self is not TransferState.PENDING


TRANSITIONS = frozenset(
    {
        (TransferState.PENDING, TransferState.POSTED),
        (TransferState.PENDING, TransferState.RETURNED),
    }
)
