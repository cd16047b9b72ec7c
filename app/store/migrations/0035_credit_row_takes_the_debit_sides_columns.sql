-- The credit side's row of a cross-shard transfer may take the debit side's metadata and hold columns, once
-- (issue 11).
--
-- A saga from a moving range to the move's own target leaves the target one row for the transfer, whichever came
-- first: the copy of the debit side's row (then it becomes the credit row in place: migration 0033, keeping the
-- debit side's columns) or the saga's message (then txr_saga_apply inserts a bare credit row, and the copy's
-- import leaves it standing). After the switch the target serves that row as the transfer; in the second order it
-- lacked the debit side's unique reference (a retried payment with the same unique reference would have been
-- accepted by the new owner), metadata, hold and creation time. The copy's import now sets them on it
-- (app/store/slotdata.py `own_merged`). Metadata and the hold's amount and expiry are immutable (0009's trigger);
-- the one change allowed here is filling them in on a posted credit row whose debit side is on another shard and
-- which has none yet: completing the row from its other side, never changing a value it had.

create or replace function transfers_check_transition() returns trigger language plpgsql as $$
begin
    if new.state is distinct from old.state and not exists (
        select 1 from transfer_transitions where from_state = old.state and to_state = new.state
    ) then
        raise exception 'transfer % cannot go from % to %', old.id, old.state, new.state
            using errcode = 'check_violation';
    end if;
    if (new.id, new.client, new.kind, new.debit_account, new.credit_account, new.currency)
        is distinct from
       (old.id, old.client, old.kind, old.debit_account, old.credit_account, old.currency)
       or (new.amount <> old.amount
           and not (old.state = 'held' and new.state in ('posted', 'pending') and new.amount < old.amount)) then
        raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
    end if;
    if (new.hold_amount, new.hold_expires_at, new.metadata)
       is distinct from (old.hold_amount, old.hold_expires_at, old.metadata) then
        if not (old.state = 'posted' and new.state = 'posted' and old.moved_from is null
                and old.hold_amount is null and old.hold_expires_at is null and old.metadata is null
                and old.debit_shard <> (select shard from shard_info)
                and old.credit_shard = (select shard from shard_info)) then
            raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
        end if;
    end if;
    return new;
end $$;
