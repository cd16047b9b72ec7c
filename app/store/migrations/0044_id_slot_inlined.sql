-- txr_id_slot (migration 0008) as a SQL function: the same expression, which PostgreSQL inlines where it is
-- used (the indexes on it, transfers_id_slot and transfer_events_id_slot, and every query), instead of calling a
-- PL/pgSQL function: six calls per posting, each paying PL/pgSQL's call set-up (issue 14, item 3). Same answers:
-- the slot of an account or transfer id, null for any other text.
create or replace function txr_id_slot(p_id text) returns integer language sql immutable as $$
    select case when p_id ~ '^(acc|trf)_[0-9a-f]{3}' then ('x' || substr(p_id, 5, 3))::bit(12)::integer end
$$;
