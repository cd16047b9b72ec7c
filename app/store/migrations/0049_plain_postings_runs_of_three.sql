-- Migration 0046's functions again, with three changes (issue 14, item 3; 0046 itself stays as it landed):
--
-- * A run shorter than 3 plain items, and a batch shorter than 3 items, goes one by one as before 0046. Below
--   that the set path's fixed statements cost more than they save. In SQL alone (one session,
--   synchronous_commit off), a batch of 1 took 1.7-2.0 ms one by one and 2.3-4.4 ms set-based; a batch of 4
--   took 1.4 ms one by one and 1.0-1.2 ms set-based. The group-commit queue sends batches of 1-3 at low load.
-- * txr_plain_items is PL/pgSQL, not SQL. A SQL function's query is planned again at every call; a PL/pgSQL
--   function keeps its plan.
-- * When txr_post_set does not find every slot of its run owned, it posts none of the run, and the whole run
--   goes one by one, in order. Before, it posted the rest of the run and left those items to the one-by-one
--   path after the run, so they posted out of batch order. How that happens: the item's ownership row was
--   split by the freeze of another range (txr_slot_split narrows the row and inserts the cut-off part, which
--   the waiting statement's snapshot cannot see), or its own slot froze after txr_post looked. Out of order,
--   an item could be refused for funds that an earlier item of the batch would have brought. An atomic batch
--   then stored `batch_refused` under its key for good. Found in review; no money could be lost.
-- * The run's stored outcomes are looked up by [client, key] as a JSON array's text, not by the two joined with
--   a separator character.

create or replace function txr_plain_items(p_batch jsonb, p_frozen jsonb, p_busy text[]) returns boolean[]
language plpgsql stable as $$
begin
    -- PL/pgSQL, not SQL: a SQL function's query is planned again at every call.
    return (
    with items as (
        select i - 1 as i, x from jsonb_array_elements(p_batch) with ordinality as t(x, i)
    ), keys as (
        select x ->> 'client' as client, x ->> 'key' as key from items group by 1, 2 having count(*) > 1
    ), system as (  -- the system accounts the batch names, and whether every amount naming them fits their room
        select a.id, a.currency,
               abs(a.balance) <= 4611686018427387904 - sum((x ->> 'amount')::bigint) as room
        from items join accounts a on a.id in (x ->> 'debit', x ->> 'credit') and a.kind <> 'customer'
        group by a.id, a.currency, a.balance
    )
    select coalesce(array_agg(
        x ->> 'kind' in ('transfer', 'deposit', 'withdrawal')
        and x ->> 'transit' is null and x ->> 'hold_expires_in_s' is null
        and not coalesce((x ->> 'credit_remote')::boolean, false)
        and not coalesce((x ->> 'unique_reference')::boolean, false)
        and not p_frozen ? i::text
        and not (x ->> 'debit' = any(p_busy) or x ->> 'credit' = any(p_busy))
        and not exists (select 1 from keys k where k.client = x ->> 'client' and k.key = x ->> 'key')
        and (x ->> 'kind' <> 'deposit' or exists (
            select 1 from system s where s.id = x ->> 'debit' and s.room and s.currency = x ->> 'currency'))
        and (x ->> 'kind' <> 'withdrawal' or exists (
            select 1 from system s where s.id = x ->> 'credit' and s.room and s.currency = x ->> 'currency'))
        order by i), '{}')
    from items);
end $$;

-- A run of plain items (batch indexes, in order): item index -> its answer; no answer at all when a slot of the
-- run is not found owned here.
create or replace function txr_post_set(p_batch jsonb, p_items integer[]) returns jsonb language plpgsql as $$
declare
    v_items integer[];  -- p_items whose slot is owned, in order
    v_busy_keys integer[];
    v_prior jsonb;  -- [client, key] as text -> the stored outcome
    v_rows accounts[];  -- the run's accounts, as the postings decided so far leave them
    v_at jsonb;  -- account id -> its position in v_rows
    v_postings integer[];  -- postings per position in v_rows
    v_answers jsonb[];  -- per position in v_items; null for a posting until it is written
    v_store integer[] := '{}';  -- positions in v_items whose answer is stored (refusals and postings)
    v_posted integer[] := '{}';  -- batch indexes of the postings, in order
    e_transfer text[] := '{}';
    e_account text[] := '{}';
    e_amount bigint[] := '{}';
    e_after bigint[] := '{}';
    v_written jsonb;  -- transfer id -> the answer of its posting
    v_k integer;
    v_i integer;
    p jsonb;
    v_amount bigint;
    d accounts;
    c accounts;
    v_dk integer;
    v_ck integer;
    v_prior_one jsonb;
    v_refusal jsonb;
begin
    -- The ownership fence, as txr_owns takes it: the owning rows FOR SHARE, so a freeze waits for this
    -- transaction and a posting after the freeze sees `moving`.
    select coalesce(array_agg(i order by n), '{}') into v_items
    from unnest(p_items) with ordinality as u(i, n)
    where (p_batch -> i ->> 'slot')::integer in (
        select q.s from (select distinct (p_batch -> j ->> 'slot')::integer as s from unnest(p_items) j) q
        cross join lateral (select 1 from slot_ownership o
                            where o.state = 'owned' and q.s between o.slot_lo and o.slot_hi for share) l);
    -- A slot not found owned (frozen since txr_post looked, or its ownership row split by a freeze of another
    -- range while this waited on it): the whole run goes one by one, in order, where txr_owns looks again.
    if cardinality(v_items) < cardinality(p_items) then
        return '{}'::jsonb;
    end if;
    -- Each key's advisory lock, in a statement of its own: the stored outcomes are read after it, in a new
    -- snapshot, so an outcome committed by the key's last holder is seen (as txr_idempotency_check does).
    select coalesce(array_agg(i), '{}') into v_busy_keys
    from unnest(v_items) i
    where not pg_try_advisory_xact_lock(
        hashtextextended((p_batch -> i ->> 'client') || chr(31) || (p_batch -> i ->> 'key'), 7));
    select coalesce(jsonb_object_agg(jsonb_build_array(o.client, o.key)::text, jsonb_build_object(
               'fingerprint', o.fingerprint, 'status', o.status_code, 'body', o.body)), '{}')
    into v_prior
    from idempotency o
    where (o.client, o.key) in (select p_batch -> i ->> 'client', p_batch -> i ->> 'key' from unnest(v_items) i);
    select coalesce(array_agg(r.acc order by r.n), '{}'), coalesce(jsonb_object_agg(r.id, r.n), '{}')
    into v_rows, v_at
    from (select acc, acc.id, row_number() over (order by acc.id) as n from accounts acc
          where acc.id in (select p_batch -> i ->> 'debit' from unnest(v_items) i
                           union select p_batch -> i ->> 'credit' from unnest(v_items) i)) r;
    v_postings := array_fill(0, array[cardinality(v_rows)]);
    v_answers := array_fill(null::jsonb, array[cardinality(v_items)]);
    -- Each item decided in order, as txr_post_one decides it, on the rows as the run has left them so far.
    for v_k in 1 .. cardinality(v_items) loop
        v_i := v_items[v_k];
        p := p_batch -> v_i;
        v_prior_one := v_prior -> jsonb_build_array(p ->> 'client', p ->> 'key')::text;
        if v_i = any(v_busy_keys) then
            v_answers[v_k] := txr_refusal(409, 'idempotency_key_in_flight',
                'a request with this Idempotency-Key is still being processed; retry it shortly');
            continue;
        end if;
        if v_prior_one is not null then
            v_answers[v_k] := case
                when v_prior_one ->> 'fingerprint' <> p ->> 'fingerprint' then
                    txr_refusal(422, 'idempotency_key_reused',
                        'this Idempotency-Key was already used for a different request')
                else jsonb_build_object('status', (v_prior_one ->> 'status')::integer, 'body', v_prior_one -> 'body',
                                        'replayed', true)
            end;
            continue;
        end if;
        v_amount := (p ->> 'amount')::bigint;
        v_dk := (v_at ->> (p ->> 'debit'))::integer;
        v_ck := (v_at ->> (p ->> 'credit'))::integer;
        d := null;
        c := null;
        if v_dk is not null then
            d := v_rows[v_dk];
        end if;
        if v_ck is not null then
            c := v_rows[v_ck];
        end if;
        v_refusal := null;
        if p ->> 'kind' <> 'deposit' then
            v_refusal := txr_customer_refusal(d, p ->> 'debit', p ->> 'client', p ->> 'currency');
        end if;
        if v_refusal is null and p ->> 'kind' <> 'withdrawal' then
            v_refusal := txr_customer_refusal(c, p ->> 'credit', p ->> 'client', p ->> 'currency');
        end if;
        if v_refusal is null and p ->> 'kind' <> 'deposit' then
            v_refusal := txr_funds_refusal(d, v_amount);
        end if;
        if v_refusal is null and c.kind = 'customer' and c.balance > 9007199254740991 - v_amount then
            v_refusal := txr_refusal(422, 'balance_limit_exceeded',
                format('account %s would exceed the largest balance, 9007199254740991', c.id));
        end if;
        v_store := array_append(v_store, v_k);
        if v_refusal is not null then
            v_answers[v_k] := v_refusal;
            continue;
        end if;
        assert d.id is not null and c.id is not null, 'posting names a missing system account';
        assert d.currency = p ->> 'currency' and c.currency = p ->> 'currency', 'system account currency';
        d.balance := d.balance - v_amount;
        c.balance := c.balance + v_amount;
        v_rows[v_dk] := d;
        v_rows[v_ck] := c;
        v_postings[v_dk] := v_postings[v_dk] + 1;
        v_postings[v_ck] := v_postings[v_ck] + 1;
        v_posted := array_append(v_posted, v_i);
        e_transfer := array_append(array_append(e_transfer, p ->> 'id'), p ->> 'id');
        e_account := array_append(array_append(e_account, d.id), c.id);
        e_amount := array_append(array_append(e_amount, -v_amount), v_amount);
        e_after := array_append(array_append(e_after, d.balance), c.balance);
    end loop;
    -- The run's writes: every balance once, then the transfers with their entries, then the stored outcomes.
    if cardinality(v_store) > 0 then
        with n as (
            select r.id, r.balance, v_postings[r.ordinality::integer] as postings
            from unnest(v_rows) with ordinality as r
            where v_postings[r.ordinality::integer] > 0
        ), moved as (
            update accounts a set balance = n.balance, version = a.version + n.postings from n where a.id = n.id
        ), t as (
            insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference,
                                   state, credit_shard, metadata)
            select x ->> 'id', x ->> 'client', x ->> 'kind', x ->> 'debit', x ->> 'credit', (x ->> 'amount')::bigint,
                   x ->> 'currency', x ->> 'reference', 'posted', x ->> 'credit_shard',
                   case when jsonb_typeof(x -> 'metadata') = 'object' then x -> 'metadata' end
            from unnest(v_posted) with ordinality as u(i, o)
            cross join lateral (select p_batch -> u.i) j(x)
            order by u.o
            returning *
        ), e as (
            insert into entries (transfer_id, account_id, amount, balance_after)
            select * from unnest(e_transfer, e_account, e_amount, e_after)
        ), answered as (
            select t.id, jsonb_build_object('status', 201, 'body', txr_transfer_body(t)) as outcome from t
        ), stored as (
            insert into idempotency (client, key, fingerprint, status_code, body, slot)
            select x ->> 'client', x ->> 'key', x ->> 'fingerprint', (o ->> 'status')::integer, o -> 'body',
                   (x ->> 'slot')::integer
            from (select p_batch -> v_items[s.k] as x, coalesce(v_answers[s.k], a.outcome) as o
                  from unnest(v_store) as s(k)
                  left join answered a on a.id = p_batch -> v_items[s.k] ->> 'id') q
        )
        select coalesce(jsonb_object_agg(id, outcome), '{}') into v_written from answered;
    end if;
    return (select jsonb_object_agg(v_items[k], coalesce(v_answers[k], v_written -> (p_batch -> v_items[k] ->> 'id')))
            from generate_subscripts(v_items, 1) k);
end $$;

-- One item of a txr_post batch on its own, as txr_post has posted every item until now.
create or replace function txr_post_alone(p jsonb) returns jsonb language plpgsql as $$
declare
    v_result jsonb;
begin
    -- A system account at its bound refuses the posting before anything is written (migration 0006).
    v_result := txr_system_bound_refusal(p);
    if v_result is null then
        v_result := txr_post_one(p);
        -- A saga message keeps its request's trace context, for every later delivery to link to.
        if v_result ? 'message' and p ? 'traceparent' then
            update outbox set traceparent = p ->> 'traceparent'
            where transfer_id = v_result -> 'message' ->> 'transfer_id';
        end if;
    end if;
    return v_result;
end $$;

-- txr_post (migrations 0043, 0046) with its runs of plain items posted together, its answers collected in an array
-- (appending to a jsonb array copied the whole array at every item).
create or replace function txr_post(p_batch jsonb, p_lock_wait_ms integer, p_patience_ms integer default 0)
returns jsonb language plpgsql as $$
declare
    v_results jsonb[] := '{}';
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
    v_plain boolean[] := '{}';  -- per item (from 1): posted with its run of plain neighbours (txr_plain_items)
    v_run integer[] := '{}';
    v_together jsonb;  -- item index -> its answer, for a run posted together
    v_k integer;
    -- Shorter runs go one by one: txr_post_set's fixed statements cost more than it saves below 3 postings
    -- (SQL alone: a batch of 1 took 2.0 ms one by one, 2.3-2.8 ms set-based; a batch of 4, 1.4 and 1.0-1.2 ms).
    v_run_min constant integer := 3;
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
    -- Runs of consecutive plain items go to txr_post_set; every other item, and a run's item it left out, is
    -- posted on its own, in batch order.
    if jsonb_array_length(p_batch) >= v_run_min then
        v_plain := txr_plain_items(p_batch, v_frozen, v_busy);
    end if;
    for v_index in 0 .. jsonb_array_length(p_batch) - 1 loop
        v_item := p_batch -> v_index;
        if v_plain[v_index + 1] then
            v_run := array_append(v_run, v_index);
            continue when coalesce(v_plain[v_index + 2], false);
            v_together := case when cardinality(v_run) >= v_run_min then txr_post_set(p_batch, v_run) else '{}' end;
            foreach v_k in array v_run loop
                v_results := array_append(v_results, coalesce(v_together -> v_k::text, txr_post_alone(p_batch -> v_k)));
            end loop;
            v_run := '{}';
        elsif v_frozen ? v_index::text then
            v_results := array_append(v_results, v_frozen -> v_index::text);
        elsif v_item ->> 'debit' = any(v_busy) or coalesce(v_item ->> 'transit', v_item ->> 'credit') = any(v_busy) then
            v_results := array_append(v_results, jsonb_build_object(
                'status', 409, 'busy', true,
                'busy_account', case when v_item ->> 'debit' = any(v_busy) then v_item ->> 'debit'
                                     else coalesce(v_item ->> 'transit', v_item ->> 'credit') end,
                'body', jsonb_build_object(
                    'code', 'account_busy',
                    'detail', 'an account of this posting is locked by another operation; nothing was posted')));
        else
            v_results := array_append(v_results, txr_post_alone(v_item));
        end if;
    end loop;
    return to_jsonb(v_results);
end $$;

-- txr_post_together (migrations 0010, 0046: atomic batches and postings with a unique reference) with its runs of plain
-- items posted together; every other item as before, through txr_post_item.
create or replace function txr_post_together(p_items jsonb, p_lock_wait_ms integer) returns jsonb
language plpgsql as $$
declare
    -- A PL/pgSQL array grows in place; appending to a jsonb array copies it, O(n^2) over 1,000 items.
    v_results jsonb[] := '{}';
    v_id text;
    v_lock_timeout text := current_setting('lock_timeout');
    v_plain boolean[] := '{}';
    v_run integer[] := '{}';
    v_together jsonb;
    v_index integer;
    v_k integer;
    v_run_min constant integer := 3;  -- as txr_post's
begin
    assert p_lock_wait_ms > 0, 'a lock wait of 0 would wait forever';
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
    from jsonb_array_elements(p_items) x where (x ->> 'transit') is not null
    on conflict (id) do nothing;
    perform set_config('lock_timeout', p_lock_wait_ms::text, true);
    begin
        for v_id in
            select x ->> 'debit' from jsonb_array_elements(p_items) x
            union
            select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_items) x
            order by 1
        loop
            perform 1 from accounts where id = v_id for update;
        end loop;
    exception when lock_not_available then
        perform set_config('lock_timeout', v_lock_timeout, true);
        return jsonb_build_object('busy', true, 'busy_account', v_id);
    end;
    perform set_config('lock_timeout', v_lock_timeout, true);
    if jsonb_array_length(p_items) >= v_run_min then
        v_plain := txr_plain_items(p_items, '{}', '{}');
    end if;
    for v_index in 0 .. jsonb_array_length(p_items) - 1 loop
        if v_plain[v_index + 1] then
            v_run := array_append(v_run, v_index);
            continue when coalesce(v_plain[v_index + 2], false);
            v_together := case when cardinality(v_run) >= v_run_min then txr_post_set(p_items, v_run) else '{}' end;
            foreach v_k in array v_run loop
                v_results := array_append(v_results, coalesce(v_together -> v_k::text, txr_post_item(p_items -> v_k)));
            end loop;
            v_run := '{}';
        else
            v_results := array_append(v_results, txr_post_item(p_items -> v_index));
        end if;
    end loop;
    return to_jsonb(v_results);
end $$;
