-- Validates migration 0043's CHECK constraints on the states of transfers and of their history. 0043 added them
-- NOT VALID, under the brief lock an ALTER TABLE takes; validating there, in the same transaction, would have
-- scanned both tables while still holding that lock, blocking every read and write of transfers for the whole
-- scan on a live ledger (from a review). Here, in a transaction of its own, VALIDATE CONSTRAINT holds only a SHARE
-- UPDATE EXCLUSIVE lock: postings and reads go on during the scan.
alter table transfers validate constraint transfers_state_known;
alter table transfer_events validate constraint transfer_events_state_known;
