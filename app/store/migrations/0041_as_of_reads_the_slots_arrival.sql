-- GET /v1/accounts/{id}?as_of= on an account that arrived by a slot move (issue 12, from a review).
--
-- Entries do not move with a slot (DESIGN D13): on the new owner an account's journal starts with the move's
-- bookings, so a time before the switch read 0 or a pre-booked balance there. The read (AS_OF_SQL in
-- app/store/shard.py) now looks up when the last move into this shard of the account's slot switched, and refuses
-- a time before it (422 as_of_before_move, naming that time). This index keeps that look-up an index probe, as
-- the rest of the statement is, however many moves a shard has recorded.
create index slot_moves_arrivals on slot_moves (slot_lo, slot_hi, switched_at)
    where role = 'target' and phase in ('switched', 'done');
