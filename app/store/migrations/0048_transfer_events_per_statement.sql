-- A new transfer's event written once per statement, not once per row (issue 14, item 3). Since migration 0046
-- a run of plain postings inserts its transfers in one statement; the row trigger txr_transfer_event then
-- still ran once per transfer, each run a PL/pgSQL call with two statements of its own (the slot-writer check
-- and the event's insert). Measured in SQL alone (one session, synchronous_commit off, batches of 100
-- transfers through txr_post_together), the row trigger cost 130-150 us of the 470-530 us of backend CPU per
-- posting.
--
-- txr_transfer_events_inserted writes the events of every transfer the statement inserted in one INSERT,
-- reading them from the statement's transition table, with the same rules as txr_transfer_event's INSERT case:
-- no event for a slot move's own transfers, nor for a slot this shard neither owns nor is moving away (a move's
-- copy into its target), nor for the credit side of a saga (its debit shard announced it); the type is
-- `transfer.<state>` and the data the transfer's body. The events keep the order the transfers were inserted
-- in. The state-change trigger (transfers_event_state, a row trigger with its WHEN clause) is unchanged.

create or replace function txr_transfer_events_inserted() returns trigger language plpgsql as $$
begin
    insert into events (id, type, client, slot, resource_id, data)
    select txr_event_id(s.slot), 'transfer.' || n.state, n.client, s.slot, n.id, txr_transfer_body(n)
    from inserted n
    cross join lateral (select txr_id_slot(n.id) as slot) s
    where n.kind <> 'move'
      and txr_event_slot_writer(s.slot)
      and not (n.debit_shard is not null and n.state = 'posted'
               and n.debit_shard is distinct from (select shard from shard_info));
    return null;
end $$;

drop trigger transfers_event_insert on transfers;
create trigger transfers_event_insert after insert on transfers referencing new table as inserted
    for each statement execute function txr_transfer_events_inserted();
