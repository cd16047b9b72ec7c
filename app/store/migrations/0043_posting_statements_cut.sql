-- Fewer statements per posting (issue 14, item 3). PostgreSQL's cost for a posting is mostly per statement:
-- each SQL statement a PL/pgSQL function runs (and each trigger's) starts an executor of its own. Counted with
-- pg_stat_statements (track = all) on one shard, postings in batches of one: 33 statements per posting before
-- this migration, against pgbench tpcb-like's 5 per transaction. This one removes those that did no work:
--
-- * txr_post set lock_timeout with PERFORM set_config(...), a statement each time (three per batch); an
--   assignment of set_config's answer is a PL/pgSQL simple expression, evaluated without an executor.
-- * txr_post inserted the batch's transit accounts with a statement that found none when no item is a saga;
--   it now runs only when an item names a transit account.
-- * txr_post's lock pass took each account in its own statement. It now first takes every account of the batch
--   in one statement, in id order, with NOWAIT; only when one is taken by another transaction does it walk them
--   one by one as before (that attempt's block is rolled back first, so it holds nothing while it waits). The
--   walk is still in id order, so two batches still never deadlock, and a stuck account is still found, waited
--   for within the batch's patience and answered busy alone.
-- * txr_owns set txr.slot with PERFORM set_config(...); now an assignment.
-- * txr_post walked its batch with a query over jsonb_array_elements; it now indexes the array.
-- * txr_post_one moved a posting's two balances in two UPDATEs, then inserted the transfer and its two entries in
--   two INSERTs; now one UPDATE of both rows, and one INSERT of the transfer with its entries (a data-modifying
--   WITH). Every trigger and constraint fires as before, per row: the moved-account fence, the change log, the
--   transfer's event, the entries' foreign keys and their deferred zero-sum check.
-- * txr_transfer_event wrote its event with PERFORM txr_event_write(...); now an assignment.
-- * transfers.state and transfer_events.state referenced transfer_states: a foreign-key check (a statement) on
--   every insert and state change. A CHECK constraint over the same six states says the same without a
--   statement; transfer_states stays, as the list of states and which are terminal (the audit reads it). A
--   migration that adds a state changes both. The constraints are added NOT VALID here (a brief lock, no scan) and
--   validated by migration 0045, in a transaction of its own, which scans without blocking reads or writes.

create or replace function txr_post(p_batch jsonb, p_lock_wait_ms integer, p_patience_ms integer default 0)
returns jsonb language plpgsql as $$
declare
    v_results jsonb := '[]'::jsonb;
    v_item jsonb;
    v_result jsonb;
    v_ids text[];
    v_id text;
    v_blocked text;
    v_busy text[] := '{}';
    v_lock_timeout text := current_setting('lock_timeout');
    v_patience_until timestamptz := clock_timestamp() + make_interval(secs => p_patience_ms / 1000.0);
    v_left_ms integer;
    v_frozen jsonb;  -- item index -> its refusal, for the items whose slot is not owned here
    v_index integer;
    v_set text;  -- set_config's answer, unused: an assignment is a simple expression, a PERFORM a statement
    v_all_locked boolean := false;
begin
    assert p_lock_wait_ms > 0, 'a lock wait of 0 would wait forever';
    -- Items for a slot not owned here are answered first, without a lock (see above).
    select coalesce(jsonb_object_agg(i - 1, txr_misdirected(s)), '{}'::jsonb) into v_frozen
    from (
        select distinct on (i) i, s
        from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        cross join lateral (values (1, (x ->> 'slot')::integer),
                                   (2, case when x ? 'transit' then null else txr_id_slot(x ->> 'credit') end)) v(n, s)
        where s is not null and case
            when n = 1 then not exists (select 1 from slot_ownership o
                                        where o.state = 'owned' and s between o.slot_lo and o.slot_hi)
            else exists (select 1 from slot_ownership o where o.state = 'moving' and s between o.slot_lo and o.slot_hi)
        end
        order by i, n
    ) f;
    -- Transit accounts are created on first use, before the lock pass so that they are locked in it.
    if jsonb_path_exists(p_batch, '$[*].transit ? (@ != null)') then
        insert into accounts (id, slot, kind, owner_client, currency)
        select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
        from jsonb_array_elements(p_batch) x where (x ->> 'transit') is not null
        on conflict (id) do nothing;
    end if;
    select coalesce(array_agg(id order by id), '{}') into v_ids from (
        select x ->> 'debit' as id from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        where not v_frozen ? (i - 1)::text
        union
        select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        where not v_frozen ? (i - 1)::text
    ) ids;
    -- First every account at once, in id order, waiting for none: the common case costs one statement. One is
    -- taken: nothing of this attempt stays locked (its block is rolled back) and the walk below finds which.
    begin
        perform 1 from accounts where id = any(v_ids) order by id for update nowait;
        v_all_locked := true;
    exception when lock_not_available then
        null;
    end;
    -- Bounded: a pass that fails either marks one more account busy, or probes one while patience lasts.
    loop
        exit when v_all_locked;
        v_blocked := null;
        v_set := set_config('lock_timeout', p_lock_wait_ms::text, true);
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
        v_set := set_config('lock_timeout', v_left_ms::text, true);
        begin
            perform 1 from accounts where id = v_blocked for update;
            raise exception using errcode = 'TXR01';
        exception
            when sqlstate 'TXR01' then null;
            when lock_not_available then v_busy := v_busy || v_blocked;
        end;
    end loop;
    v_set := set_config('lock_timeout', v_lock_timeout, true);
    for v_index in 0 .. jsonb_array_length(p_batch) - 1 loop
        v_item := p_batch -> v_index;
        if v_frozen ? v_index::text then
            v_results := v_results || jsonb_build_array(v_frozen -> v_index::text);
        elsif v_item ->> 'debit' = any(v_busy) or coalesce(v_item ->> 'transit', v_item ->> 'credit') = any(v_busy) then
            v_results := v_results || jsonb_build_array(jsonb_build_object(
                'status', 409, 'busy', true,
                'busy_account', case when v_item ->> 'debit' = any(v_busy) then v_item ->> 'debit'
                                     else coalesce(v_item ->> 'transit', v_item ->> 'credit') end,
                'body', jsonb_build_object(
                    'code', 'account_busy',
                    'detail', 'an account of this posting is locked by another operation; nothing was posted')));
        else
            -- A system account at its bound refuses the posting before anything is written (item 2 below).
            v_result := txr_system_bound_refusal(v_item);
            if v_result is null then
                v_result := txr_post_one(v_item);
                -- A saga message keeps its request's trace context, for every later delivery to link to.
                if v_result ? 'message' and v_item ? 'traceparent' then
                    update outbox set traceparent = v_item ->> 'traceparent'
                    where transfer_id = v_result -> 'message' ->> 'transfer_id';
                end if;
            end if;
            v_results := v_results || jsonb_build_array(v_result);
        end if;
    end loop;
    return v_results;
end $$;

create or replace function txr_owns(p_slot integer) returns boolean language plpgsql volatile as $$
declare
    v_set text;
begin
    v_set := set_config('txr.slot', p_slot::text, true);
    perform 1 from slot_ownership where p_slot between slot_lo and slot_hi and state = 'owned' for share;
    if found then
        return true;
    end if;
    perform 1 from slot_ownership where p_slot between slot_lo and slot_hi and state = 'owned' for share;
    return found;
end $$;

alter table transfers drop constraint transfers_state_fkey;
alter table transfers add constraint transfers_state_known
    check (state in ('pending', 'posted', 'returned', 'held', 'voided', 'expired')) not valid;
alter table transfer_events drop constraint transfer_events_state_fkey;
alter table transfer_events add constraint transfer_events_state_known
    check (state in ('pending', 'posted', 'returned', 'held', 'voided', 'expired')) not valid;


-- txr_post_one (migration 0009) with the non-hold posting's four writes in two statements.
create or replace function txr_post_one(p jsonb) returns jsonb language plpgsql as $$
declare
    v_kind text := p ->> 'kind';
    v_client text := p ->> 'client';
    v_amount bigint := (p ->> 'amount')::bigint;
    v_currency text := p ->> 'currency';
    v_transit text := p ->> 'transit';
    v_saga boolean := (p ->> 'transit') is not null;
    v_hold boolean := (p ->> 'hold_expires_in_s') is not null;
    v_remote boolean := coalesce((p ->> 'credit_remote')::boolean, false);
    v_metadata jsonb := case when jsonb_typeof(p -> 'metadata') = 'object' then p -> 'metadata' end;
    v_message jsonb;
    v_prior jsonb;
    v_refusal jsonb;
    v_debit accounts;
    v_credit accounts;
    v_transfer transfers;
    v_at timestamptz;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    assert not (v_hold and (v_saga or v_kind = 'deposit')), 'a hold is a transfer or a withdrawal, never a saga';
    select * into v_debit from accounts where id = p ->> 'debit';
    select * into v_credit from accounts where id = coalesce(v_transit, p ->> 'credit');
    if v_kind <> 'deposit' then
        v_refusal := txr_customer_refusal(v_debit, p ->> 'debit', v_client, v_currency);
    end if;
    if v_refusal is null and v_kind <> 'withdrawal' and not v_saga and not v_remote then
        v_refusal := txr_customer_refusal(v_credit, p ->> 'credit', v_client, v_currency);
    end if;
    if v_refusal is null and v_kind <> 'deposit' then
        v_refusal := txr_funds_refusal(v_debit, v_amount);
    end if;
    if v_refusal is null and v_credit.kind = 'customer' and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded',
            format('account %s would exceed the largest balance, 9007199254740991', v_credit.id));
    end if;
    if v_refusal is not null then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_refusal);
    end if;
    -- System accounts (settlement, transit) exist before this runs (txr_open_account, txr_post).
    assert v_debit.id is not null and (v_credit.id is not null or v_remote), 'posting names a missing system account';
    assert v_debit.currency = v_currency and (v_remote or v_credit.currency = v_currency), 'system account currency';

    if v_hold then
        -- One instant for the hold's creation, its history and its expiry, so a read as of any time sees it whole.
        v_at := clock_timestamp();
        update accounts set held = held + v_amount, version = version + 1 where id = v_debit.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               hold_amount, hold_expires_at, idempotency_key, metadata, created_at)
        values (p ->> 'id', v_client, v_kind, v_debit.id, p ->> 'credit', v_amount, v_currency, p ->> 'reference',
                'held', v_amount, v_at + make_interval(secs => (p ->> 'hold_expires_in_s')::integer),
                p ->> 'key', v_metadata, v_at)
        returning * into v_transfer;
        insert into transfer_events (transfer_id, seq, state, at) values (v_transfer.id, 1, 'held', v_at);
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 201, 'body', txr_transfer_body(v_transfer)));
    end if;

    -- Both balances in one statement, then the transfer and its two entries in one (they were four).
    with moved as (
        update accounts set balance = balance + case when id = v_debit.id then -v_amount else v_amount end,
                            version = version + 1
        where id in (v_debit.id, v_credit.id)
        returning id, balance
    )
    select (select balance from moved where id = v_debit.id), (select balance from moved where id = v_credit.id)
    into v_debit.balance, v_credit.balance;
    with t as (
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               debit_shard, credit_shard, idempotency_key, metadata)
        values (p ->> 'id', v_client, v_kind, v_debit.id, p ->> 'credit', v_amount, v_currency, p ->> 'reference',
                case when v_saga then 'pending' else 'posted' end,
                case when v_saga then (select shard from shard_info) end,
                p ->> 'credit_shard',
                case when v_saga then p ->> 'key' end,
                v_metadata)
        returning *
    ), e as (
        insert into entries (transfer_id, account_id, amount, balance_after)
        select t.id, x.account, x.amount, x.balance_after from t
        cross join (values (v_debit.id, -v_amount, v_debit.balance), (v_credit.id, v_amount, v_credit.balance))
            x(account, amount, balance_after)
    )
    select * into v_transfer from t;
    if not v_saga then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 201, 'body', txr_transfer_body(v_transfer)));
    end if;
    insert into transfer_events (transfer_id, seq, state) values (v_transfer.id, 1, 'pending');
    v_message := txr_saga_message(v_transfer, p);
    -- The message goes back to the caller too (not into the stored response), for the fast path.
    return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 202, 'body', txr_transfer_body(v_transfer)))
        || jsonb_build_object('message', v_message || jsonb_build_object('destination_region', p ->> 'credit_region'));
end $$;

-- txr_transfer_event (migration 0015), writing its event by an assignment.
create or replace function txr_transfer_event() returns trigger language plpgsql as $$
declare
    v_type text;
    v_slot integer := txr_id_slot(new.id);
    v_written text;  -- txr_event_write's void, as text: an assignment is a simple expression, a PERFORM a statement
begin
    if new.kind = 'move' or not txr_event_slot_writer(v_slot) then
        return null;
    end if;
    if tg_op = 'INSERT' then
        if new.debit_shard is not null and new.state = 'posted'
           and new.debit_shard is distinct from (select shard from shard_info) then
            return null;
        end if;
        v_type := 'transfer.' || new.state;
    elsif old.state = 'held' and new.state in ('posted', 'pending') then
        v_type := 'transfer.captured';
    else
        v_type := 'transfer.' || new.state;
    end if;
    v_written := txr_event_write(v_type, new.client, v_slot, new.id, txr_transfer_body(new))::text;
    return null;
end $$;
