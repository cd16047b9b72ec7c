-- A posting for a slot this shard does not own now is answered before it asks for any lock (issue 11).
--
-- Group commit locks a batch's accounts first and checks ownership after (txr_post_one's txr_owns). A slot move
-- holds every account row of its range for seconds at 10,000 accounts: the source's switch-out while it books
-- the range out, the target's switch-in while it books it in. A posting for such an account waited for it (its
-- batch's patience, then alone with more patience) and was answered after the wait: on the source slot_moving
-- (since 6ae951c), on the target, which does not own the range until its switch-in commits, 409 account_busy.
-- `txroute bench move` at 10,000 accounts showed those 409s reaching the moving range's clients, and every resend
-- of a request its router held met the same wait again; meanwhile the waiting postings held the retry slots the
-- rest of the shard's postings need.
--
-- Now each batch first answers the items whose slot (the one txr_owns checks) is not owned here, or whose
-- same-shard credit account is in a frozen range, with the refusal txr_owns would have led to (txr_misdirected:
-- 503 slot_moving while frozen, 421 naming the new owner once moved, a bare 421 for a range the shard does not
-- own yet, which a router holds until its map explains it), and leaves their accounts out of the lock pass. (A
-- credit into a range that has moved away is still refused by the moved-account fence, migration 0014, which
-- makes the region read its map again and send the retry as a saga.)
-- Nothing is written for them, nothing stored. The check reads ownership without a lock; a freeze that begins
-- after it is met by txr_owns' fence under its row lock as before, and a posting that still waits out its
-- patience on such an account is answered slot_moving by the caller (ShardStore._busy_outcome). It costs one
-- statement per batch over the few rows of slot_ownership.
--
-- A same-shard credit into a frozen range was let through until the switch booked the range out (the switch
-- books the balance it finds then); it is now refused for the whole freeze like every other write to the
-- range, which is what the freeze promises ("no posting commits on the source after the freeze").

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
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
    from jsonb_array_elements(p_batch) x where (x ->> 'transit') is not null
    on conflict (id) do nothing;
    select coalesce(array_agg(id order by id), '{}') into v_ids from (
        select x ->> 'debit' as id from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        where not v_frozen ? (i - 1)::text
        union
        select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        where not v_frozen ? (i - 1)::text
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
    v_index := -1;
    for v_item in select value from jsonb_array_elements(p_batch) loop
        v_index := v_index + 1;
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
