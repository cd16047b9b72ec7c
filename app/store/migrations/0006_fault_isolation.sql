-- Fault isolation (issue 10): one stuck account must not fail the postings it happens to be batched with.
--
-- Group commit (DESIGN D11) locks every account of a batch in one pass in id order. Before this migration
-- that pass waited up to the session's lock_timeout for each row, and a timeout aborted the whole batch:
-- postings on healthy accounts failed with the one whose account was held by a stuck session.
-- Now the pass waits at most p_lock_wait_ms for a row while holding the rows before it; a row still locked
-- then is waited for holding no lock at all (the pass lets go, probes that row: takes its lock and gives it
-- straight back, then starts again) for at most p_patience_ms in total. Past that the account is "busy":
-- the postings that need it leave the batch with a `busy` result (409 account_busy, NOT stored as their
-- idempotent answer: a retry must be able to succeed) and the rest of the batch commits. The caller retries
-- a busy posting alone with more patience (app/store/shard.py, app/limits.py). So a stuck account keeps
-- no other account locked for more than p_lock_wait_ms at a time, and hot rows shared by every batch (a
-- settlement account) are still simply waited for.
--
-- The pass is still one ordered walk (skipping a busy account keeps the order), so batches cannot deadlock.
-- It runs inside one exception block: a lock timeout rolls the block back, which releases the locks taken
-- in it, and the walk starts again. That is one subtransaction per batch (plus one per busy account or
-- probe), never one per row: a transaction with more than 64 subtransactions that hold an xid overflows
-- PostgreSQL's per-backend subxid cache and slows every snapshot on the server.
create function txr_post(p_batch jsonb, p_lock_wait_ms integer, p_patience_ms integer default 0)
returns jsonb language plpgsql as $$
declare
    v_results jsonb := '[]'::jsonb;
    v_item jsonb;
    v_ids text[];
    v_id text;
    v_blocked text;
    v_busy text[] := '{}';
    v_lock_timeout text := current_setting('lock_timeout');
    v_patience_until timestamptz := clock_timestamp() + make_interval(secs => p_patience_ms / 1000.0);
    v_left_ms integer;
begin
    assert p_lock_wait_ms > 0, 'a lock wait of 0 would wait forever';
    -- Transit accounts are created on first use, before the lock pass so that they are locked in it.
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
    from jsonb_array_elements(p_batch) x where (x ->> 'transit') is not null
    on conflict (id) do nothing;
    select array_agg(id order by id) into v_ids from (
        select x ->> 'debit' as id from jsonb_array_elements(p_batch) x
        union
        select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_batch) x
    ) ids;
    -- Bounded: a pass that fails either marks one more account busy, or probes one while patience lasts.
    loop
        v_blocked := null;
        perform set_config('lock_timeout', p_lock_wait_ms::text, true);
        begin
            foreach v_id in array v_ids loop
                continue when v_id = any(v_busy);
                perform 1 from accounts where id = v_id for update;
            end loop;
        exception when lock_not_available then
            v_blocked := v_id;
        end;
        exit when v_blocked is null;
        v_left_ms := floor(extract(epoch from v_patience_until - clock_timestamp()) * 1000)::integer;
        if v_left_ms <= 0 then
            v_busy := v_busy || v_blocked;
            continue;
        end if;
        -- Wait for the blocked account holding nothing, then let go of it again (the block is rolled back).
        perform set_config('lock_timeout', v_left_ms::text, true);
        begin
            perform 1 from accounts where id = v_blocked for update;
            raise exception using errcode = 'TXR01';
        exception
            when sqlstate 'TXR01' then null;
            when lock_not_available then v_busy := v_busy || v_blocked;
        end;
    end loop;
    perform set_config('lock_timeout', v_lock_timeout, true);
    for v_item in select value from jsonb_array_elements(p_batch) loop
        if v_item ->> 'debit' = any(v_busy) or coalesce(v_item ->> 'transit', v_item ->> 'credit') = any(v_busy) then
            v_results := v_results || jsonb_build_array(jsonb_build_object(
                'status', 409, 'busy', true, 'body', jsonb_build_object(
                    'code', 'account_busy',
                    'detail', 'an account of this posting is locked by another operation; nothing was posted')));
        else
            v_results := v_results || jsonb_build_array(txr_post_one(v_item));
        end if;
    end loop;
    return v_results;
end $$;

-- The one-argument form (migration 0002) keeps working for any caller left, with the pool's default lock
-- wait (app/limits.py DB_LOCK_TIMEOUT_MS).
create or replace function txr_post(p_batch jsonb) returns jsonb language plpgsql as $$
begin
    return txr_post(p_batch, 2000, 0);
end $$;
