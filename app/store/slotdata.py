"""The per-slot tables: the one list of what a slot move carries (issue 11, DESIGN D13).

A table whose rows belong to a slot is added to SLOT_TABLES here, in the order rows are imported (a table after those
its foreign keys name), and its migration adds the change-log trigger the catch-up reads:

    create trigger <table>_move_log after insert or update or delete on <table>
        for each row execute function txr_move_log('column' | 'id', <slot column>, <key columns>...);

(The same trigger logs, on a move's target, the writes to the range its mover did not make: migration 0036.)

('column': the slot is an integer column; 'id': it is embedded in an account or transfer id column.)
tests/integration/test_slot_freeze.py checks that every table registered has that trigger with these
arguments. Money is not copied: balances move by balancing postings at the switch (migration 0008), so
`entries` and the outbox are not here (sagas debited from a moving range settle before the switch).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SlotTable:
    name: str
    key: tuple[str, ...]  # primary key columns
    slot_by: str  # 'column' or 'id' (as the trigger's first argument)
    slot_column: str
    # Which of the table's rows in the range move (SQL over alias t, where :source_shard is the move's source
    # shard, on either side), beyond the slot.
    where: str = "true"
    # Columns whose copy on the target takes another value (SQL over the source row's alias r; $2 is the
    # move's source shard).
    overrides: dict[str, str] = field(default_factory=dict)
    # Columns left out of the verify checksum (those overridden, and any the copy sets on its own).
    unchecked: tuple[str, ...] = ()
    # Columns the copy sets when it inserts a row and never changes on a row the target has already.
    insert_only: tuple[str, ...] = ()
    # On a conflict with a row the target has already: 'update' (the copy follows the source's row) or
    # 'nothing' (the target's own row stands); `update_where` narrows which rows may be updated.
    on_conflict: str = "update"
    update_where: str = "true"
    # After the switch: 'delete' the source's rows (those `where` selects), or 'keep' them as archived history
    # (never served, since the slot is `moved`; kept because the source's journal refers to them).
    source_after_switch: str = "keep"
    # Which target rows a cancelled move drops (SQL over alias t), beyond the slot.
    drop_where: str = "true"
    # Rows of the range the target holds as its own, not as copies (SQL over alias t; None: none can be), which
    # the verify leaves out on both sides: e.g. the credit side of a saga from the range to the target itself.
    target_own: str | None = None
    # Columns the copy sets on a row of the target's own as well, and which of those rows (SQL over alias t; $2 is
    # the move's source shard): the source's side of a row both sides hold under one key.
    own_merged: tuple[str, ...] = ()
    own_merged_where: str = "false"

    def rows(self, source_shard: str) -> str:
        """`where` for one move (its source shard as a quoted literal)."""
        return self.where.replace(":source_shard", "'" + source_shard.replace("'", "''") + "'")

    def slot_sql(self, alias: str) -> str:
        column = f"{alias}.{self.slot_column}"
        return f"txr_id_slot({column})" if self.slot_by == "id" else column


SLOT_TABLES: tuple[SlotTable, ...] = (
    SlotTable(
        "accounts", ("id",), "column", "slot",
        # Customer accounts only: a shard's settlement and transit accounts stay, whatever their slot column.
        where="t.kind = 'customer'",
        # The balance arrives by balancing postings (the target's pre-booking and switch-in), never by copy: a
        # copied account starts at zero, and a later copy of it leaves what its entries say (migration 0031).
        overrides={"balance": "0", "version": "0"},
        unchecked=("balance", "version"),
        insert_only=("balance", "version"),
        drop_where="not exists (select 1 from entries e where e.account_id = t.id)",
    ),
    SlotTable(
        "transfers", ("id",), "id", "id",
        # A copy keeps naming the shard whose journal holds its entries ($2: the move's source shard). An open
        # hold has no entry yet: its copy is the transfer's home from now on (the new owner captures it there).
        overrides={"moved_from": "case when r.state = 'held' then null else coalesce(r.moved_from, $2) end"},
        unchecked=("moved_from",),
        update_where="transfers.moved_from is not null or transfers.state = 'held'",
        target_own="t.moved_from is null and t.state <> 'held'",
        # The credit side of a saga from the range that the target applied itself before the copy of the debit
        # side's row came: the debit side's own columns join it, so it ends as it would had the copy come first
        # (migration 0033: the copy then becomes the credit row), e.g. a unique reference stays unique on the new
        # owner. Its state and shards stay the credit side's.
        own_merged=("created_at", "reference_unique", "metadata", "hold_amount", "hold_expires_at", "resolution_key",
                    "idempotency_key"),
        own_merged_where="t.moved_from is null and t.state = 'posted' and t.debit_shard = $2",
        drop_where="t.moved_from is not null",
    ),
    SlotTable(
        "transfer_events", ("transfer_id", "seq"), "id", "transfer_id",
        on_conflict="nothing",
        drop_where="exists (select 1 from transfers x where x.id = t.transfer_id and x.moved_from is not null)",
    ),
    SlotTable("idempotency", ("client", "key"), "column", "slot", source_after_switch="delete"),
    SlotTable(
        "inbox", ("transfer_id",), "id", "credit_account", on_conflict="nothing", source_after_switch="delete",
        # A saga this shard debited and applied itself (its credit slot had moved here) stays with its journal.
        where="not t.applied_by_source",
    ),
    # Webhook endpoints live on their client's home slot (issue 13) and move with it, with their deliveries
    # (the schedule and feed position go along: the new shard's worker goes on where the old one stopped; the
    # old one delivers only endpoints whose slot it owns) and attempts. `events` is not here: events stay in the
    # stream of the shard that wrote them, which the feed reads until retention (migration 0011).
    SlotTable("webhook_endpoints", ("id",), "column", "slot", source_after_switch="delete"),
    SlotTable("webhook_deliveries", ("endpoint_id", "event_id"), "column", "slot", source_after_switch="delete"),
    SlotTable("webhook_attempts", ("id",), "column", "slot", source_after_switch="delete"),
)

