-- Plain postings of a batch posted together (issue 14, item 3). A posting's cost in PostgreSQL is mostly per
-- statement: each INSERT or UPDATE starts an executor, opens its indexes and builds its table's check
-- constraints from their stored text. txr_post_one runs about ten such statements per posting; a batch of 8 ran
-- 80. Measured in SQL alone (one session, synchronous_commit off, 200,000 transfers on the shard), a prototype
-- posting a batch's transfers set-based cost 40% less backend CPU per posting in batches of 8 and 60% less in
-- batches of 64.
--
-- txr_post_set posts, in a handful of statements, every item of a txr_post batch that is plain:
--   * a transfer, deposit or withdrawal that is no hold, starts no saga, names no remote credit and asks no
--     unique reference;
--   * its slot is owned and not frozen, and none of its accounts is busy;
--   * its Idempotency-Key appears once in the batch;
--   * each of its accounts is used by no other item of the batch, unless it is a system account (the shard's
--     settlement account of a deposit or withdrawal) that exists in the posting's currency and is so far from
--     its bound (txr_system_bound_refusal) that no order of the batch's items could reach it.
-- So what decides each plain item's answer (its customer accounts, their funds, its key) is touched by no other
-- item of the batch, and posting the plain items first and then the others one by one, in batch order, answers
-- each item exactly as posting them all one by one would; the batch is one transaction either way. The answers
-- are txr_post_one's, text for text: the same refusal functions run on the same rows. Every trigger and
-- constraint fires as before, per row: the moved-account fence, the change log, the events, the entries' foreign
-- keys and their deferred zero-sum check. Each entry's balance_after is its account's balance after the entries
-- before it: a running sum over the plain items in batch order, then the batch's other items add theirs. So a
-- settlement account's chain is whole, though a deposit posted together comes before a deposit of the same
-- batch posted one by one (the order of a batch's items is the order the requests reached the queue: any order
-- is theirs).
--
-- The rest (holds, sagas, unique references, items sharing an account, a key twice) go one by one as before.

create or replace function txr_post_set(p_batch jsonb, p_items integer[]) returns jsonb language plpgsql as $$
declare
    v_slots integer[];
    v_owned integer[];
    v_busy_keys integer[];
    v_results jsonb;
begin
    -- The ownership fence, as txr_owns takes it: the owning rows FOR SHARE, so a freeze waits for this
    -- transaction and a posting after the freeze sees `moving`. An item whose slot is not found owned here is
    -- left out (not answered): the caller posts it one by one, which answers it or looks again.
    select array_agg(distinct (p_batch -> i ->> 'slot')::integer) into v_slots from unnest(p_items) i;
    select coalesce(array_agg(s), '{}') into v_owned
    from unnest(v_slots) s
    cross join lateral (
        select 1 from slot_ownership o where o.state = 'owned' and s between o.slot_lo and o.slot_hi for share
    ) l;
    -- Each key's advisory lock, in a statement of its own: the stored outcomes are read after it, in a new
    -- snapshot, so an outcome committed by the key's last holder is seen (as txr_idempotency_check does).
    select coalesce(array_agg(i), '{}') into v_busy_keys
    from unnest(p_items) i
    where (p_batch -> i ->> 'slot')::integer = any(v_owned)
      and not pg_try_advisory_xact_lock(
          hashtextextended((p_batch -> i ->> 'client') || chr(31) || (p_batch -> i ->> 'key'), 7));
    with items as (
        select i, x ->> 'id' as id, x ->> 'kind' as kind, x ->> 'client' as client, x ->> 'key' as key,
               x ->> 'fingerprint' as fingerprint, x ->> 'debit' as debit, x ->> 'credit' as credit,
               (x ->> 'amount')::bigint as amount, x ->> 'currency' as currency, (x ->> 'slot')::integer as slot,
               x ->> 'reference' as reference, x ->> 'credit_shard' as credit_shard,
               case when jsonb_typeof(x -> 'metadata') = 'object' then x -> 'metadata' end as metadata
        from unnest(p_items) i
        cross join lateral (select p_batch -> i) j(x)
        where (x ->> 'slot')::integer = any(v_owned)
    ), keyed as (
        select items.*, i = any(v_busy_keys) as key_busy, p.fingerprint as prior_fingerprint,
               p.status_code as prior_status, p.body as prior_body
        from items left join idempotency p on p.client = items.client and p.key = items.key
    ), judged as materialized (
        -- txr_post_one's refusals, in its order, on the same rows.
        select k.*, case
            when k.key_busy or k.prior_fingerprint is not null then null
            when k.kind <> 'deposit' and txr_customer_refusal(d, k.debit, k.client, k.currency) is not null
                then txr_customer_refusal(d, k.debit, k.client, k.currency)
            when k.kind <> 'withdrawal' and txr_customer_refusal(c, k.credit, k.client, k.currency) is not null
                then txr_customer_refusal(c, k.credit, k.client, k.currency)
            when k.kind <> 'deposit' and txr_funds_refusal(d, k.amount) is not null
                then txr_funds_refusal(d, k.amount)
            when c.kind = 'customer' and c.balance > 9007199254740991 - k.amount
                then txr_refusal(422, 'balance_limit_exceeded',
                    format('account %s would exceed the largest balance, 9007199254740991', c.id))
        end as refusal
        from keyed k
        left join accounts d on d.id = k.debit
        left join accounts c on c.id = k.credit
    ), posting as (
        select * from judged where not key_busy and prior_fingerprint is null and refusal is null
    ), signed as (  -- every entry: debit first, then credit, in batch order
        select i, 0 as side, id as transfer_id, debit as account, -amount as amount from posting
        union all
        select i, 1, id, credit, amount from posting
    ), chained as (
        select s.*, a.balance + sum(s.amount) over (partition by s.account order by s.i, s.side) as balance_after
        from signed s join accounts a on a.id = s.account
    ), moved as (
        update accounts a set balance = a.balance + d.delta, version = a.version + d.postings
        from (select account, sum(amount) as delta, count(*) as postings from signed group by account) d
        where a.id = d.account
    ), t as (
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               credit_shard, metadata)
        select id, client, kind, debit, credit, amount, currency, reference, 'posted', credit_shard, metadata
        from posting order by i
        returning *
    ), e as (
        insert into entries (transfer_id, account_id, amount, balance_after)
        select transfer_id, account, amount, balance_after from chained order by i, side
    ), answered as (
        select t.id, jsonb_build_object('status', 201, 'body', txr_transfer_body(t)) as outcome from t
    ), outcomes as materialized (
        select j.i, j.client, j.key, j.fingerprint, j.slot, j.key_busy, j.prior_fingerprint is not null as known,
               case
                   when j.key_busy then txr_refusal(409, 'idempotency_key_in_flight',
                       'a request with this Idempotency-Key is still being processed; retry it shortly')
                   when j.prior_fingerprint is not null and j.prior_fingerprint <> j.fingerprint then
                       txr_refusal(422, 'idempotency_key_reused',
                           'this Idempotency-Key was already used for a different request')
                   when j.prior_fingerprint is not null then
                       jsonb_build_object('status', j.prior_status, 'body', j.prior_body, 'replayed', true)
                   else coalesce(j.refusal, a.outcome)
               end as outcome
        from judged j left join answered a on a.id = j.id
    ), stored as (  -- what txr_idempotency_store keeps: each outcome but a busy key's or a known key's
        insert into idempotency (client, key, fingerprint, status_code, body, slot)
        select client, key, fingerprint, (outcome ->> 'status')::integer, outcome -> 'body', slot
        from outcomes where not key_busy and not known
    )
    select coalesce(jsonb_object_agg(i, outcome), '{}'::jsonb) into v_results from outcomes;
    return v_results;
end $$;

-- txr_post (migration 0043) with its plain items posted together first, and its answers collected in an array
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
    v_plain integer[];
    v_together jsonb := '{}';  -- item index -> its answer, for the plain items posted together
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
    -- The plain items (see txr_post_set), posted together before the others.
    with items as (
        select i - 1 as i, x, x ->> 'debit' as debit, x ->> 'credit' as credit
        from jsonb_array_elements(p_batch) with ordinality as t(x, i)
        where not v_frozen ? (i - 1)::text
    ), uses as (
        select i, debit as account, (x ->> 'amount')::bigint as amount, x ->> 'currency' as currency from items
        union all
        select i, coalesce(x ->> 'transit', credit), (x ->> 'amount')::bigint, x ->> 'currency' from items
    ), shared as (  -- accounts used by more than one item, with every amount that uses them
        select account, sum(amount) as total, bool_and(uses.currency = a.currency) as one_currency,
               a.id is not null and a.kind <> 'customer'
                   and abs(a.balance) <= 4611686018427387904 - sum(amount) as system_with_room
        from uses left join accounts a on a.id = uses.account
        group by account, a.id, a.kind, a.balance
        having count(distinct i) > 1
    ), keys as (
        select x ->> 'client' as client, x ->> 'key' as key from jsonb_array_elements(p_batch) x
        group by 1, 2 having count(*) > 1
    )
    select coalesce(array_agg(i order by i), '{}') into v_plain
    from items
    where x ->> 'kind' in ('transfer', 'deposit', 'withdrawal')
      and x ->> 'transit' is null and x ->> 'hold_expires_in_s' is null
      and not coalesce((x ->> 'credit_remote')::boolean, false)
      and not coalesce((x ->> 'unique_reference')::boolean, false)
      and not (debit = any(v_busy) or credit = any(v_busy))
      and not exists (select 1 from keys k where k.client = x ->> 'client' and k.key = x ->> 'key')
      and not exists (select 1 from shared s where s.account in (debit, credit)
                      and not (s.system_with_room and s.one_currency))
      and (x ->> 'kind' <> 'deposit'
           or exists (select 1 from accounts a where a.id = debit and a.kind <> 'customer'
                      and a.currency = x ->> 'currency'
                      and abs(a.balance) <= 4611686018427387904 - (x ->> 'amount')::bigint))
      and (x ->> 'kind' <> 'withdrawal'
           or exists (select 1 from accounts a where a.id = credit and a.kind <> 'customer'
                      and a.currency = x ->> 'currency'
                      and abs(a.balance) <= 4611686018427387904 - (x ->> 'amount')::bigint));
    if cardinality(v_plain) > 0 then
        v_together := txr_post_set(p_batch, v_plain);
    end if;
    for v_index in 0 .. jsonb_array_length(p_batch) - 1 loop
        v_item := p_batch -> v_index;
        if v_together ? v_index::text then
            v_results := v_results || (v_together -> v_index::text);
        elsif v_frozen ? v_index::text then
            v_results := v_results || (v_frozen -> v_index::text);
        elsif v_item ->> 'debit' = any(v_busy) or coalesce(v_item ->> 'transit', v_item ->> 'credit') = any(v_busy) then
            v_results := v_results || jsonb_build_object(
                'status', 409, 'busy', true,
                'busy_account', case when v_item ->> 'debit' = any(v_busy) then v_item ->> 'debit'
                                     else coalesce(v_item ->> 'transit', v_item ->> 'credit') end,
                'body', jsonb_build_object(
                    'code', 'account_busy',
                    'detail', 'an account of this posting is locked by another operation; nothing was posted'));
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
            v_results := v_results || v_result;
        end if;
    end loop;
    return to_jsonb(v_results);
end $$;
